//! The proxy's upstream for peer fills: a loopback HTTP listener that turns a request into a
//! QUIC peer fetch from the edge named in [`super::PEER_VIA_HEADER`] and streams the answer
//! back. The cache path in front of it stays pingora-cache's, so a peer-filled object gets
//! the same freshness, size limits and lock coalescing as an origin-filled one.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;

use super::link::{client_endpoint, ClientEndpoint, Link, Rest};
use super::protocol::{ErrorCode, PeerRef, Reply, Request};
use super::tls::{edge_name, NodeIdentity};
use super::{is_hop_header, parse_peer_via, SyncError, PEER_VIA_HEADER};
use crate::proxy::primary_key;

/// Longest wait for a peer's response head, and for each chunk of its body.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests in flight to one peer, bodies still streaming included (the peer accepts 64
/// streams per connection: below it, no request waits for stream credit).
const PEER_INFLIGHT: usize = 32;
/// Longest wait for one of those slots: past it the fill goes to the origin at once rather
/// than after the whole `PEER_TIMEOUT`.
const PERMIT_WAIT: Duration = Duration::from_millis(250);

/// Links to peer edges, created on first use over one client endpoint.
pub struct PeerPool {
    identity: NodeIdentity,
    endpoint: OnceLock<ClientEndpoint>,
    links: parking_lot::Mutex<HashMap<PeerRef, Arc<Link>>>,
}

impl PeerPool {
    /// A pool presenting `identity` to peers.
    pub fn new(identity: NodeIdentity) -> Self {
        PeerPool {
            identity,
            endpoint: OnceLock::new(),
            links: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// Close the pool's endpoint, if it was ever opened (shutdown, after the drain).
    pub async fn close(&self) {
        if let Some(e) = self.endpoint.get() {
            super::link::close_endpoint(e).await;
        }
    }

    /// The link to `peer`; must run inside a tokio runtime (the endpoint's driver needs one).
    pub fn link(&self, peer: &PeerRef) -> Result<Arc<Link>, SyncError> {
        if let Some(l) = self.links.lock().get(peer) {
            return Ok(l.clone());
        }
        let endpoint = match self.endpoint.get() {
            Some(e) => e.clone(),
            None => {
                let e = client_endpoint(&self.identity, peer.addr)?;
                self.endpoint.get_or_init(|| e).clone()
            }
        };
        let mut links = self.links.lock();
        // A fleet is small; a pool that grew past it holds stale addresses.
        if links.len() >= 256 {
            links.clear();
        }
        Ok(links
            .entry(peer.clone())
            .or_insert_with(|| {
                Arc::new(
                    Link::new(endpoint, peer.addr, edge_name(&peer.id), PEER_INFLIGHT)
                        .with_permit_wait(PERMIT_WAIT),
                )
            })
            .clone())
    }
}

/// The bridge's router state.
#[derive(Clone)]
pub struct PeerBridge {
    pool: Arc<PeerPool>,
}

impl PeerBridge {
    /// A bridge over `pool`.
    pub fn new(pool: Arc<PeerPool>) -> Self {
        PeerBridge { pool }
    }

    /// Every path is a peer fetch.
    pub fn router(self) -> Router {
        Router::new().fallback(fetch).with_state(self)
    }
}

fn miss(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

async fn fetch(State(b): State<PeerBridge>, req: HttpRequest) -> Response {
    let h = req.headers();
    let (Some(peer), Some(host)) = (
        h.get(PEER_VIA_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_peer_via),
        h.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) else {
        let msg = format!("needs Host and {PEER_VIA_HEADER}: id@addr");
        return miss(StatusCode::BAD_REQUEST, "bad_peer_request", msg);
    };
    let key = primary_key(host, req.uri().path_and_query().map_or("/", |p| p.as_str()));
    let link = match b.pool.link(&peer) {
        Ok(l) => l,
        Err(e) => return miss(StatusCode::BAD_GATEWAY, "peer_unreachable", e.to_string()),
    };
    let (status, headers, recv) = match link
        .open(
            &Request::PeerFetch {
                key: key.clone(),
                accept_encoding: h
                    .get(header::ACCEPT_ENCODING)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            },
            PEER_TIMEOUT,
        )
        .await
    {
        // A peer answers only with a copy it holds (2xx); anything else (a redirect, an
        // informational status) would be stored and served as this key's answer. The edge
        // counts 404 as the peer not holding a copy and other failures as errors.
        Ok((Reply::PeerHead { status, .. }, _)) if !(200..300).contains(&status) => {
            return miss(
                StatusCode::NOT_FOUND,
                "peer_miss",
                format!("{} answered {key} with status {status}", peer.id),
            )
        }
        Ok((Reply::PeerHead { status, headers }, recv)) => (status, headers, recv),
        Ok((
            Reply::Error {
                code: ErrorCode::NotFound,
                message,
            },
            _,
        )) => {
            return miss(
                StatusCode::NOT_FOUND,
                "peer_miss",
                format!("{} does not hold {key}: {message}", peer.id),
            )
        }
        Ok((other, _)) => {
            return miss(
                StatusCode::SERVICE_UNAVAILABLE,
                "peer_failed",
                format!("{} did not serve {key}: {other:?}", peer.id),
            )
        }
        Err(e) => return miss(StatusCode::BAD_GATEWAY, "peer_unreachable", e.to_string()),
    };
    let mut resp = Response::new(Body::from_stream(body_stream(recv)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in headers {
        if is_hop_header(&name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

/// The rest of a QUIC stream as a body; a reset ends it with an error so a truncated object
/// is never cached as whole. It holds its slot on the link until it ends.
fn body_stream(rest: Rest) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold(Some(rest), |state| async move {
        let mut rest = state?;
        // A stream that stalls (its connection kept alive) would hold its slot for ever.
        match tokio::time::timeout(PEER_TIMEOUT, rest.recv.read_chunk(64 * 1024, true)).await {
            Ok(Ok(Some(chunk))) => Some((Ok(chunk.bytes), Some(rest))),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some((Err(std::io::Error::other(e)), None)),
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "peer body stalled",
                )),
                None,
            )),
        }
    })
}
