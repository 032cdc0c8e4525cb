//! Every error an admin API answers is JSON, including the ones axum writes by itself: an
//! extractor's rejection (a missing query parameter, bad percent-encoding, a body over the
//! limit) is plain text, and a known path called with the wrong method is an empty 405.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Longest plain-text error body carried over into the JSON message.
const MAX_MESSAGE: usize = 4096;

/// Middleware (`axum::middleware::from_fn(json_errors)`) that rewrites a non-JSON 4xx/5xx as
/// `{"error": <code>, "message": <text>}` with the same status (and `Allow` for a 405).
pub async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let allow: Option<HeaderValue> = resp.headers().get(header::ALLOW).cloned();
    let text = axum::body::to_bytes(resp.into_body(), MAX_MESSAGE)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = (
        status,
        Json(json!({ "error": code(status), "message": message })),
    )
        .into_response();
    if let Some(a) = allow {
        out.headers_mut().insert(header::ALLOW, a);
    }
    out
}

fn code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::Query;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    #[derive(serde::Deserialize)]
    struct Q {
        #[allow(dead_code)]
        key: String,
    }

    fn app() -> Router {
        Router::new()
            .route("/q", get(|_: Query<Q>| async { "ok" }))
            .route(
                "/json",
                get(|| async { (StatusCode::CONFLICT, Json(json!({"error": "mine"}))) }),
            )
            .layer(axum::middleware::from_fn(json_errors))
    }

    async fn call(method: &str, uri: &str) -> (StatusCode, Option<HeaderValue>, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let resp = app().oneshot(req).await.unwrap();
        let (status, allow) = (resp.status(), resp.headers().get(header::ALLOW).cloned());
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, allow, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn rejections_and_405s_become_json_and_json_errors_pass_through() {
        let (s, _, v) = call("GET", "/q").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"], "bad_request");
        assert!(v["message"].as_str().unwrap().contains("key"), "{v}");
        let (s, allow, v) = call("POST", "/q").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(v["error"], "method_not_allowed");
        assert!(allow.is_some_and(|a| a.to_str().unwrap().contains("GET")));
        let (s, _, v) = call("GET", "/json").await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(v, json!({"error": "mine"}));
    }
}
