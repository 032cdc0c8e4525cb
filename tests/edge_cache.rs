//! The edge node as an operator runs it: the real `edge-node` binary in front of a scriptable
//! origin, on loopback ports chosen at run time.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use shadowcdn_tests::cluster::{edge_config, EdgeProc, EDGE_TOKEN};
use shadowcdn_tests::origin::body_for;
use shadowcdn_tests::{client, free_port, sample, text, wait_until, Binary, TestOrigin};

const HOST: &str = "test.local";
const TOKEN: &str = EDGE_TOKEN;

type Edge = EdgeProc;

fn start_edge(origin: SocketAddr, dir: &Path, cache_extra: &str) -> Edge {
    EdgeProc::start(dir, "test-edge", &[(HOST.to_string(), origin)], cache_extra)
}

trait EdgeExt {
    fn url(&self, path: &str) -> String;
    async fn get(&self, path: &str) -> reqwest::Response;
    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response;
    async fn purge(&self, key: &str, token: &str) -> reqwest::Response;
    async fn metrics(&self) -> String;
}

impl EdgeExt for Edge {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.request(Method::GET, path, &[]).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut r = client()
            .request(method, self.url(path))
            .header("host", HOST);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.expect("edge answers")
    }

    async fn purge(&self, key: &str, token: &str) -> reqwest::Response {
        client()
            .request(
                Method::from_bytes(b"PURGE").unwrap(),
                format!("http://{}/cache/{key}", self.admin),
            )
            .bearer_auth(token)
            .send()
            .await
            .expect("admin answers")
    }

    async fn metrics(&self) -> String {
        text(format!("http://{}/metrics", self.admin)).await
    }
}

fn x_cache(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn body_of(r: reqwest::Response) -> Vec<u8> {
    r.bytes().await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_counts_the_age_a_response_arrived_with() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // max-age 6, but it already spent 3 s in another cache: 3 s of freshness are left.
    let url = "/aged.txt?cc=max-age%3D6&age=3";
    assert_eq!(x_cache(&edge.get(url).await), "MISS");
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "HIT");
    let age: u64 = r.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age >= 3, "the Age served counts the upstream's: {age}");
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let r = edge.get(url).await;
    assert_ne!(x_cache(&r), "HIT", "served past its freshness");
    assert_eq!(origin.hits("/aged.txt"), 2);

    // A 304 that spent time in another cache refreshes the copy by what it has left too.
    let url = "/aged-304.txt?cc=max-age%3D6&age=3&etag=a";
    assert_eq!(x_cache(&edge.get(url).await), "MISS");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(x_cache(&edge.get(url).await), "REVALIDATED");
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "HIT");
    let age: u64 = r.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age >= 3, "the Age served counts the 304's: {age}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_after_miss_and_head() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");

    let r = edge.get("/a.txt?size=5000").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&r), "MISS");
    assert!(r.headers()["cache-status"]
        .to_str()
        .unwrap()
        .contains("fwd=miss"));
    assert_eq!(body_of(r).await, body_for("/a.txt", 5000));

    let r = edge.get("/a.txt?size=5000").await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(body_of(r).await, body_for("/a.txt", 5000));
    assert_eq!(origin.hits("/a.txt"), 1);

    let r = edge.request(Method::HEAD, "/a.txt?size=5000", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.headers()["content-length"], "5000");
    assert_eq!(origin.hits("/a.txt"), 1);

    // The query string is part of the key.
    let r = edge.get("/a.txt?size=10").await;
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(origin.hits("/a.txt"), 2);

    // A hit answers with the fields the miss had, in the same order (names compare
    // case-insensitively: hits do not keep the origin's spelling), apart from what says
    // how it was answered.
    let fields = |r: &reqwest::Response| -> Vec<(String, String)> {
        let says_how = ["x-cache", "cache-status", "age", "date"];
        r.headers()
            .iter()
            .filter(|(n, _)| !says_how.contains(&n.as_str()))
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect()
    };
    let path = "/fields.txt?size=10&headers=3&etag=v1&ct=text/plain";
    let miss = edge.get(path).await;
    assert_eq!(x_cache(&miss), "MISS");
    let hit = edge.get(path).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(fields(&hit), fields(&miss));
    assert!(fields(&hit).iter().any(|(n, _)| n == "x-pad-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_coalesce_into_one_origin_fetch() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/slow?size=200000&delay_ms=700";
    let reqs = (0..20).map(|_| edge.get(path));
    let resps = futures::future::join_all(reqs).await;
    for r in resps {
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body_of(r).await, body_for("/slow", 200_000));
    }
    assert_eq!(
        origin.hits("/slow"),
        1,
        "20 concurrent misses must make one origin fetch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_and_private_are_not_cached() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "default_ttl_secs = 300");
    for _ in 0..3 {
        let r = edge.get("/ns?cc=no-store").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_ne!(x_cache(&r), "HIT");
        let r = edge.get("/priv?cc=private,max-age=60").await;
        assert_ne!(x_cache(&r), "HIT");
    }
    assert_eq!(origin.hits("/ns"), 3);
    assert_eq!(origin.hits("/priv"), 3);
    // A bare `private` on one line and `private="…"` on a later one: pingora's parser keeps
    // the later, but the response is still one user's.
    let split = "/priv2?cc=private%2C%20max-age%3D60&hdr=cache-control%3Aprivate%3D%22x%22";
    for _ in 0..2 {
        assert_ne!(x_cache(&edge.get(split).await), "HIT");
    }
    assert_eq!(origin.hits("/priv2"), 2);
    // Likewise a bare `no-cache` beside a later `no-cache="…"`: every use is revalidated.
    let split = "/nc2?cc=no-cache%2C%20max-age%3D60&hdr=cache-control%3Ano-cache%3D%22x%22&etag=n";
    assert_eq!(x_cache(&edge.get(split).await), "MISS");
    assert_eq!(x_cache(&edge.get(split).await), "REVALIDATED");
    // A response setting a cookie is one client's (a session, a login): never stored, with
    // or without an explicit lifetime, so no other client is handed that cookie...
    for cc in ["none", "public,max-age=60"] {
        let path = format!("/sc-{}?cc={cc}&set_cookie=sid%3Dalice", cc.len());
        for _ in 0..2 {
            let r = edge.get(&path).await;
            assert_ne!(x_cache(&r), "HIT", "{path}");
            assert_eq!(r.headers()["set-cookie"], "sid=alice");
        }
        assert_eq!(origin.hits(path.split('?').next().unwrap()), 2, "{path}");
    }
    // ...unless the origin names the cookie as the part not to store.
    let path = "/sc-named?cc=max-age%3D60,no-cache%3D%22set-cookie%22&set_cookie=sid%3Dalice";
    edge.get(path).await;
    let r = edge.get(path).await;
    assert!(!r.headers().contains_key("set-cookie"));
    assert_eq!(origin.hits("/sc-named"), 1);
    // No explicit lifetime: the configured default TTL applies.
    edge.get("/plain?cc=none").await;
    let r = edge.get("/plain?cc=none").await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(origin.hits("/plain"), 1);
    // A site whose origin sets cookies on everything can have them dropped: no client gets
    // one, and the responses are cached.
    let row = serde_json::json!({"host": HOST, "upstream": format!("http://{}", origin.addr),
                                 "strip_set_cookie": true});
    let (s, v) = admin_json(
        &edge,
        Method::PUT,
        "/origins",
        Some(serde_json::json!({"origins": [row], "allow_private_upstreams": true})),
    )
    .await;
    assert_eq!(
        (s, &v["rejected"]),
        (StatusCode::OK, &serde_json::json!([])),
        "{v}"
    );
    let path = "/sc-stripped?set_cookie=sid%3Dalice";
    for expect in ["MISS", "HIT"] {
        let r = edge.get(path).await;
        assert_eq!(x_cache(&r), expect);
        assert!(!r.headers().contains_key("set-cookie"));
    }
    assert_eq!(origin.hits("/sc-stripped"), 1);
    // A 304 that sets a cookie refreshes the copy and hands the cookie to nobody.
    // Fresh for 3 s after the 304: the HIT after it must not find it stale again on a loaded
    // machine.
    let path = "/sc-revalidated?set_cookie=sid%3Dalice&etag=v1&cc=max-age%3D3";
    let not_modified = origin.not_modified();
    edge.get(path).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for expect in ["REVALIDATED", "HIT"] {
        let r = edge.get(path).await;
        assert_eq!(x_cache(&r), expect);
        assert!(!r.headers().contains_key("set-cookie"));
    }
    assert_eq!(origin.not_modified(), not_modified + 1);
}

/// A push from a newer broker, whose rows carry options this edge does not know, applies
/// those rows without the options and says which it left out, instead of refusing the whole
/// push (which would freeze the edge's origin table until it is upgraded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_row_with_unknown_options_applies_without_them() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "");
    let row = json!({"host": "new.test", "upstream": format!("http://{}", origin.addr),
                     "strip_set_cookie": true, "some_future_option": {"x": 1}});
    let (s, v) = admin_json(
        &edge,
        Method::PUT,
        "/origins",
        Some(json!({"origins": [row], "allow_private_upstreams": true})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["ignored"],
        json!([{"index": 0, "host": "new.test", "fields": ["some_future_option"]}]),
        "{v}"
    );
    let r = client()
        .get(edge.url("/fresh?set_cookie=a%3D1"))
        .header("host", "new.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        !r.headers().contains_key("set-cookie"),
        "the known option applies"
    );
    let m = edge.metrics().await;
    assert!(
        m.contains("shadowcdn_edge_origin_push_ignored_fields 1"),
        "{m}"
    );
    // A known field with the wrong type still refuses the push.
    let bad = json!({"origins": [
        {"host": "fine.test", "upstream": "http://127.0.0.1:1"},
        {"host": "bad.test", "upstream": 5},
    ]});
    let (s, v) = admin_json(&edge, Method::PUT, "/origins", Some(bad)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let message = v["message"].as_str().unwrap();
    assert!(
        message.starts_with("origins[1] (host \"bad.test\"): "),
        "{v}"
    );
    // A table past axum's 2 MiB default body is read (and judged) whole, not refused as
    // too large: the broker pushes every host of the fleet in one body.
    let padded = json!({"origins": [{"host": 5, "upstream": "x".repeat(3 << 20)}]});
    let (s, v) = admin_json(&edge, Method::PUT, "/origins", Some(padded)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // The push is kept: restarted, the edge serves the host, options and all, before any
    // broker pushes again.
    assert_eq!(edge.child.terminate(), Some(0));
    edge.spawn();
    let r = client()
        .get(edge.url("/after-restart?set_cookie=a%3D1"))
        .header("host", "new.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!r.headers().contains_key("set-cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_on_revalidation_does_not_replace_the_stored_copy() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // s-maxage: validate once stale, with no stale-if-error window; the 500 carries the
    // same lifetime as the good answer.
    let path = "/flaky?cc=s-maxage%3D1&errors_at=2";
    assert_eq!(edge.get(path).await.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = edge.get(path).await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR, "passed on");
    // The error was not stored over the copy: the next request revalidates it again.
    let r = edge.get(path).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(origin.hits("/flaky"), 3);
    let r = edge.get(path).await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(origin.hits("/flaky"), 3);
}

/// A server error on a miss does not make the key "uncacheable" in pingora's predictor: once
/// the origin recovers, concurrent requests still share one fetch instead of all bypassing
/// the cache lock. While it fails, the requests waiting on the lock go to the origin on their
/// own at once rather than queueing behind one failure after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_on_a_miss_keeps_the_key_behind_the_cache_lock() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/recovering?errors_at=1,2,3,4,5,6&error_cc=no-store&delay_ms=1000";
    let resps = futures::future::join_all((0..6).map(|_| edge.get(path))).await;
    for r in resps {
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    // One failed fetch, then the five waiters' own fetches side by side. Queued one behind
    // another (pingora retries the lock twice), at most three would overlap.
    assert_eq!(origin.hits("/recovering"), 6);
    let overlapping = origin.max_in_flight("/recovering");
    assert!(overlapping >= 4, "at most {overlapping} fetches at once");
    let resps = futures::future::join_all((0..8).map(|_| edge.get(path))).await;
    for r in resps {
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(
        origin.hits("/recovering"),
        7,
        "one fetch for the 8 concurrent requests once the origin recovered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_keeps_variants_apart() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/v?vary=accept-language";
    for lang in ["en", "fr", "en", "fr"] {
        let r = edge
            .request(Method::GET, path, &[("accept-language", lang)])
            .await;
        assert_eq!(body_of(r).await, format!("variant={lang}").into_bytes());
    }
    assert_eq!(origin.hits("/v"), 2, "one fetch per variant");
    let r = edge
        .request(Method::GET, path, &[("accept-language", "fr")])
        .await;
    assert_eq!(x_cache(&r), "HIT");
}

/// An origin varying on `Accept-Encoding` gets one variant per coding, not one per way of
/// spelling the field: the edge asks it with the coding the client is best served with, and
/// clients that spell the same preference differently share the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_encoding_variants_are_one_per_coding() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/ae?vary=accept-encoding&ct=application/octet-stream";
    let get = |ae: Option<&'static str>| {
        let edge = &edge;
        async move {
            let headers: Vec<(&str, &str)> =
                ae.map(|v| ("accept-encoding", v)).into_iter().collect();
            let r = edge.request(Method::GET, path, &headers).await;
            let cache = x_cache(&r);
            (cache, String::from_utf8(body_of(r).await).unwrap())
        }
    };
    let miss = |variant: &str| ("MISS".to_string(), format!("variant={variant}"));
    let hit = |variant: &str| ("HIT".to_string(), format!("variant={variant}"));
    assert_eq!(get(Some("gzip, deflate, br")).await, miss("br"));
    assert_eq!(get(Some("br;q=1.0, gzip;q=0.8, *;q=0.1")).await, hit("br"));
    assert_eq!(get(Some("gzip, deflate, br, zstd")).await, hit("br"));
    assert_eq!(get(Some("gzip, deflate")).await, miss("gzip"));
    assert_eq!(get(Some("br;q=0, gzip")).await, hit("gzip"));
    // Asked with `identity`: an origin that compresses when the field is absent must not fill
    // the copy served to clients that refused every coding (RFC 9110 §12.5.3).
    assert_eq!(get(None).await, miss("identity"));
    assert_eq!(get(Some("deflate")).await, hit("identity"));
    assert_eq!(origin.hits("/ae"), 3);

    // A shadow fill asks for the coding clients asked for most (br, three times of seven
    // above), so the copy it places is the one a browser's request finds.
    let key = format!("{HOST}/shadowed?vary=accept-encoding&ct=application/octet-stream");
    assert!(shadow_marked(&edge, serde_json::json!({"key": key, "ttl_secs": 60})).await);
    let r = edge
        .request(
            Method::GET,
            "/shadowed?vary=accept-encoding&ct=application/octet-stream",
            &[("accept-encoding", "gzip, deflate, br")],
        )
        .await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(body_of(r).await, b"variant=br");
}

/// A request with `Authorization` whose answer the origin did not allow to be cached is
/// answered uncached, and that says nothing about the key: the stored copy keeps serving
/// everyone else (remembering the key as uncacheable would let any client switch its cache
/// off with one such request for a variant not stored yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorized_request_does_not_turn_the_keys_cache_off() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/auth?vary=accept-language&cc=max-age%3D300";
    let get = |lang: &'static str, auth: bool| {
        let mut h = vec![("accept-language", lang)];
        if auth {
            h.push(("authorization", "Bearer someone"));
        }
        let edge = &edge;
        async move { edge.request(Method::GET, path, &h).await }
    };
    assert_eq!(x_cache(&get("en", false).await), "MISS");
    assert_eq!(x_cache(&get("en", false).await), "HIT");
    for lang in ["fr", "de"] {
        let r = get(lang, true).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_ne!(x_cache(&r), "HIT");
    }
    assert_eq!(origin.hits("/auth"), 3);
    assert_eq!(x_cache(&get("en", false).await), "HIT");
    assert_eq!(
        x_cache(&get("de", false).await),
        "MISS",
        "the authorized answer was not stored"
    );
    assert_eq!(x_cache(&get("de", false).await), "HIT");
    assert_eq!(origin.hits("/auth"), 4);
}

/// The same for a logged-in client: a request with a `Cookie` that the origin answers as that
/// user's page (`private`, a `Set-Cookie`) does not switch the key's cache off for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_cookie_does_not_turn_the_keys_cache_off() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/mine?vary=accept-language&personal=1&cc=max-age%3D300";
    let get = |lang: &'static str, cookie: bool| {
        let mut h = vec![("accept-language", lang)];
        if cookie {
            h.push(("cookie", "session=someone"));
        }
        let edge = &edge;
        async move { edge.request(Method::GET, path, &h).await }
    };
    assert_eq!(x_cache(&get("en", false).await), "MISS");
    for lang in ["fr", "de"] {
        let r = get(lang, true).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_ne!(x_cache(&r), "HIT");
        assert_eq!(r.headers()["set-cookie"], "seen=1");
    }
    assert_eq!(x_cache(&get("en", false).await), "HIT");
    assert_eq!(
        x_cache(&get("en", true).await),
        "HIT",
        "a stored copy serves it"
    );
    assert_eq!(x_cache(&get("de", false).await), "MISS");
    let r = get("de", false).await;
    assert_eq!(x_cache(&r), "HIT");
    assert!(!r.headers().contains_key("set-cookie"));
    assert_eq!(origin.hits("/mine"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_object_is_revalidated_with_304() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/r?cc=max-age=1&etag=v1&size=3000";
    assert_eq!(x_cache(&edge.get(path).await), "MISS");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = edge.get(path).await;
    assert_eq!(x_cache(&r), "REVALIDATED");
    assert_eq!(body_of(r).await, body_for("/r", 3000));
    assert_eq!(origin.not_modified(), 1);
    let sent = origin.last_headers("/r").unwrap();
    assert_eq!(sent["if-none-match"], "\"v1\"");
    // The 304 refreshed the entry: fresh again.
    assert_eq!(x_cache(&edge.get(path).await), "HIT");

    // Last-Modified validation works the same way.
    let path = "/lm?cc=max-age=1&lm=1";
    edge.get(path).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(x_cache(&edge.get(path).await), "REVALIDATED");
    assert_eq!(origin.not_modified(), 2);
    let sent = origin.last_headers("/lm").unwrap();
    assert!(sent.contains_key("if-modified-since"), "{sent:?}");

    // With both, only the entity tag is asked: a date-only origin answers a change within the
    // same second with the new body, not a 304 under the new tag.
    let path = "/both?cc=max-age=1&lm=1&etag=v1";
    edge.get(path).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(x_cache(&edge.get(path).await), "REVALIDATED");
    let sent = origin.last_headers("/both").unwrap();
    assert_eq!(sent["if-none-match"], "\"v1\"");
    assert!(!sent.contains_key("if-modified-since"), "{sent:?}");
}

/// A refill after a prefix purge is kept even when it arrives already aged: the purge judges
/// when this edge stored the copy, not when another cache first did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aged_refill_after_a_prefix_purge_is_kept() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let url = "/aged/a?cc=max-age%3D600&age=300";
    assert_eq!(x_cache(&edge.get(url).await), "MISS");
    assert_eq!(x_cache(&edge.get(url).await), "HIT");
    let r = edge.purge(&format!("{HOST}/aged/*"), TOKEN).await;
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(x_cache(&edge.get(url).await), "MISS");
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "HIT");
    let age: u64 = r.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(
        (300..310).contains(&age),
        "Age still counts the upstream's: {age}"
    );
    assert_eq!(origin.hits("/aged/a"), 2);
}

/// `Vary: *` never matches a later request (RFC 9111 §4.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_star_is_never_served_from_cache() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let url = "/vstar?vary=*";
    edge.get(url).await;
    assert_ne!(x_cache(&edge.get(url).await), "HIT");
    assert_eq!(origin.hits("/vstar"), 2);
}

/// The configured stale windows do not apply to a response that demands validation first:
/// `no-cache` is revalidated, not served stale while revalidating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_is_revalidated_even_with_default_stale_windows() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(
        origin.addr,
        dir.path(),
        "stale_while_revalidate_secs = 60\nstale_if_error_secs = 60",
    );
    let nc = "/nc?cc=no-cache&etag=v1";
    // Nor in windows the origin grants itself (RFC 9111 §4.2.4).
    let own = "/nc-own?cc=no-cache%2C%20stale-while-revalidate%3D60&etag=v1";
    let plain = "/plain?cc=max-age%3D1";
    assert_eq!(x_cache(&edge.get(nc).await), "MISS");
    assert_eq!(x_cache(&edge.get(own).await), "MISS");
    edge.get(plain).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(x_cache(&edge.get(nc).await), "REVALIDATED");
    assert_eq!(x_cache(&edge.get(own).await), "REVALIDATED");
    // A response that states nothing gets the operator's window.
    assert_eq!(x_cache(&edge.get(plain).await), "STALE-UPDATING");
}

/// The client's own `Cache-Control` (RFC 9111 §5.2.1): `no-store` keeps the response to it
/// out of the cache; `only-if-cached` gets a 504 for what is not cached, and the copy for
/// what is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_no_store_and_only_if_cached_are_honoured() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/asked?cc=max-age%3D60";
    let no_store = [("cache-control", "no-store")];
    let r = edge.request(Method::GET, path, &no_store).await;
    assert_eq!((r.status(), x_cache(&r)), (StatusCode::OK, "BYPASS".into()));
    assert_eq!(x_cache(&edge.get(path).await), "MISS", "not stored");
    assert_eq!(x_cache(&edge.get(path).await), "HIT");
    assert_eq!(origin.hits("/asked"), 2);

    let cached_only = [("cache-control", "only-if-cached")];
    let r = edge
        .request(Method::GET, "/kept?cc=max-age%3D60", &cached_only)
        .await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(origin.hits("/kept"), 0);
    // The answer it asked for, not an error of the edge's.
    let m = edge.metrics().await;
    let errors = sample(
        &m,
        "shadowcdn_edge_requests_total",
        &["cache_status=\"error\""],
    );
    assert_eq!(errors.unwrap_or(0.0), 0.0, "{m}");
    edge.get("/kept?cc=max-age%3D60").await;
    let r = edge
        .request(Method::GET, "/kept?cc=max-age%3D60", &cached_only)
        .await;
    assert_eq!((r.status(), x_cache(&r)), (StatusCode::OK, "HIT".into()));
    assert_eq!(origin.hits("/kept"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_stale_when_origin_is_down() {
    let mut origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let sie = "/sie?cc=max-age=1,stale-if-error=600&size=1000";
    let strict = "/strict?cc=max-age=1&size=1000";
    // A window given twice differently grants none (pingora alone kept the later).
    let twice = "/sie-twice?cc=max-age=1,stale-if-error=0&hdr=cache-control:stale-if-error=600";
    edge.get(sie).await;
    edge.get(strict).await;
    edge.get(twice).await;
    origin.stop().await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let r = edge.get(sie).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&r), "STALE");
    assert_eq!(body_of(r).await, body_for("/sie", 1000));

    // Without stale-if-error a stale object is not served: 502 with a JSON body.
    let r = edge.get(twice).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{:?}", r.headers());
    let r = edge.get(strict).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(x_cache(&r), "ERROR");
    let cache_status = r.headers()["cache-status"].to_str().unwrap();
    assert!(
        cache_status.ends_with("; fwd=stale; detail=origin_unreachable"),
        "{cache_status}"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "origin_unreachable");
    let port = origin.addr.port().to_string();
    assert!(
        !v["message"].as_str().unwrap().contains(&port),
        "a client is not told where the origin is: {v}"
    );

    // Nothing cached and origin down: 502.
    let r = edge.get("/never-seen").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let cache_status = r.headers()["cache-status"].to_str().unwrap();
    assert!(
        cache_status.ends_with("; fwd=miss; detail=origin_unreachable"),
        "{cache_status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/swr?cc=max-age=1,stale-while-revalidate=60&size=500";
    edge.get(path).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = edge.get(path).await;
    assert_eq!(x_cache(&r), "STALE-UPDATING");
    assert_eq!(body_of(r).await, body_for("/swr", 500));
    // The background refresh reaches the origin and the next request is a fresh hit.
    let mut fresh = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if origin.hits("/swr") == 2 && x_cache(&edge.get(path).await) == "HIT" {
            fresh = true;
            break;
        }
    }
    assert!(fresh, "object refreshed in the background");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_to_every_reader_while_filling() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // 16 chunks of 16 KiB, 100 ms apart: the fill takes about 1.6 s.
    let path = "/stream?size=262144&chunked=1&chunk_delay_ms=100";
    let url = edge.url(path);
    let first = {
        let url = url.clone();
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            let mut r = client().get(url).header("host", HOST).send().await.unwrap();
            let mut first_byte = None;
            let mut body = Vec::new();
            while let Some(c) = r.chunk().await.unwrap() {
                first_byte.get_or_insert(start.elapsed());
                body.extend_from_slice(&c);
            }
            (first_byte.unwrap(), start.elapsed(), body)
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A second reader joins mid-fill and is fed from the same fill.
    let second = client().get(url).header("host", HOST).send().await.unwrap();
    let second_body = second.bytes().await.unwrap();
    let (ttfb, total, body) = first.await.unwrap();
    let expected = body_for("/stream", 262_144);
    assert_eq!(body, expected);
    assert_eq!(second_body.to_vec(), expected);
    assert!(
        ttfb < total / 2,
        "first byte after {ttfb:?} of {total:?}: not streamed"
    );
    assert_eq!(
        origin.hits("/stream"),
        1,
        "the joining reader did not go to the origin"
    );
    assert_eq!(x_cache(&edge.get(path).await), "HIT");
}

/// A Range request that arrives while the object is still filling gets its range from the
/// fill (206), not the whole body, and does not go to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_joining_a_fill_gets_its_range() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // 16 chunks of 16 KiB under a Content-Length, 100 ms apart.
    let path = "/joined.bin?size=262144&chunked=1&with_length=1&chunk_delay_ms=100";
    let full = body_for("/joined.bin", 262_144);
    let first = {
        let url = edge.url(path);
        tokio::spawn(async move {
            let r = client().get(url).header("host", HOST).send().await.unwrap();
            r.bytes().await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    // One range already written, one spanning chunks still to come.
    for (range, start, end) in [
        ("bytes=100-16483", 100, 16_484),
        ("bytes=200000-230000", 200_000, 230_001),
    ] {
        let r = edge.request(Method::GET, path, &[("range", range)]).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {start}-{}/262144", end - 1).as_str()
        );
        assert_eq!(body_of(r).await, full[start..end].to_vec(), "{range}");
    }
    assert_eq!(first.await.unwrap().to_vec(), full);
    assert_eq!(
        origin.hits("/joined.bin"),
        1,
        "the ranges were served from the fill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_served_from_cache() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/range.bin?size=100000";
    let full = body_for("/range.bin", 100_000);
    edge.get(path).await;

    let r = edge
        .request(Method::GET, path, &[("range", "bytes=10-19")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(body_of(r).await, full[10..20].to_vec());

    let r = edge
        .request(Method::GET, path, &[("range", "bytes=-5")])
        .await;
    assert_eq!(body_of(r).await, full[99_995..].to_vec());

    let r = edge
        .request(Method::GET, path, &[("range", "bytes=0-3,50-53")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("multipart/byteranges"), "{ct}");
    let body = body_of(r).await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("Content-Range: bytes 0-3/100000")
            || text.contains("content-range: bytes 0-3/100000"),
        "{text}"
    );
    assert!(text.contains(std::str::from_utf8(&full[50..54]).unwrap()));

    let r = edge
        .request(Method::GET, path, &[("range", "bytes=200000-")])
        .await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(origin.hits("/range.bin"), 1);
}

/// A Range request for an object over `max_object_size` gets its range, not the whole
/// object: the edge asked the origin for all of it (to fill the cache) and then found it too
/// large to keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_an_object_too_large_to_cache_is_still_a_range() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/huge.bin?size=1500000";
    let full = body_for("/huge.bin", 1_500_000);
    let r = edge
        .request(Method::GET, path, &[("range", "bytes=10-19")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/1500000");
    assert_eq!(body_of(r).await, full[10..20].to_vec());
    // The key is now known to be too large: later requests go to the origin with their Range.
    edge.request(Method::GET, path, &[("range", "bytes=20-29")])
        .await;
    let seen = origin.last_headers("/huge.bin").unwrap();
    assert_eq!(seen["range"], "bytes=20-29");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_key_and_prefix() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    for p in ["/p/one", "/p/two", "/q/three"] {
        edge.get(p).await;
        assert_eq!(x_cache(&edge.get(p).await), "HIT");
    }

    let r = edge.purge(&format!("{HOST}/p/one"), "wrong-token").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(x_cache(&edge.get("/p/one").await), "HIT");

    let r = edge.purge(&format!("{HOST}/p/one"), TOKEN).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&edge.get("/p/one").await), "MISS");
    assert_eq!(origin.hits("/p/one"), 2);

    let r = edge.purge(&format!("{HOST}/nothing-here"), TOKEN).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = edge.purge("no-slash", TOKEN).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // A pasted URL names no host: refused, not answered as a purge that matches nothing.
    let r = edge.purge(&format!("http://{HOST}/p/*"), TOKEN).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("not a URL"), "{v}");

    let r = edge.purge(&format!("{HOST}/p/*"), TOKEN).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&edge.get("/p/one").await), "MISS");
    assert_eq!(x_cache(&edge.get("/p/two").await), "MISS");
    assert_eq!(x_cache(&edge.get("/q/three").await), "HIT");
}

/// Text responses are compressed for clients that accept it and served as stored to those
/// that do not, from one cache entry; ranges, other types and `no-transform` responses are
/// never compressed, and a weakened ETag still revalidates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_is_compressed_for_clients_that_accept_it() {
    use std::io::Read;
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let page = "/z/page.html?size=20000&ct=text/html%3B%20charset%3Dutf-8&etag=v1";
    let full = body_for("/z/page.html", 20_000);

    let gz = [("accept-encoding", "gzip, br")];
    let r = edge.request(Method::GET, page, &gz).await;
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert!(r.headers()["vary"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("accept-encoding"));
    assert_eq!(r.headers()["etag"], "W/\"v1\"");
    let packed = body_of(r).await;
    assert!(packed.len() < full.len() / 2, "{} bytes", packed.len());
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(packed.as_slice())
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, full);

    let r = edge.get(page).await;
    assert_eq!(x_cache(&r), "HIT");
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(
        r.headers()["vary"],
        "Accept-Encoding",
        "another client gets it compressed"
    );
    assert_eq!(r.headers()["content-length"], "20000");
    assert_eq!(body_of(r).await, full);

    let r = edge
        .request(Method::GET, page, &[("accept-encoding", "br")])
        .await;
    assert_eq!(
        (
            x_cache(&r).as_str(),
            r.headers()["content-encoding"].to_str().unwrap()
        ),
        ("HIT", "br")
    );
    // A HEAD gets the header its GET gets (RFC 9110 §9.3.2).
    let r = edge.request(Method::HEAD, page, &gz).await;
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("gzip"));
    assert_eq!(header(&r, "etag").as_deref(), Some("W/\"v1\""));
    assert_eq!(header(&r, "content-length"), None);
    let r = edge.request(Method::HEAD, page, &[]).await;
    assert_eq!(header(&r, "content-encoding"), None);
    assert_eq!(header(&r, "content-length").as_deref(), Some("20000"));

    let r = edge
        .request(Method::GET, page, &[gz[0], ("if-none-match", "W/\"v1\"")])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    // A 304 carries the Vary and ETag its 200 would have (RFC 9110 §15.4.5).
    let vary_and_etag = |r: &reqwest::Response| {
        (
            r.headers()
                .get("vary")
                .map(|v| v.to_str().unwrap().to_string()),
            r.headers()["etag"].to_str().unwrap().to_string(),
        )
    };
    assert_eq!(
        vary_and_etag(&r),
        (Some("Accept-Encoding".into()), "W/\"v1\"".into())
    );
    let r = edge
        .request(Method::GET, page, &[("if-none-match", "\"v1\"")])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(
        vary_and_etag(&r),
        (Some("Accept-Encoding".into()), "\"v1\"".into())
    );
    let photo = "/z/photo.png?size=5000&ct=image/png&etag=p1";
    edge.get(photo).await;
    let r = edge
        .request(Method::GET, photo, &[gz[0], ("if-none-match", "\"p1\"")])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(vary_and_etag(&r), (None, "\"p1\"".into()), "not text");

    let r = edge
        .request(Method::GET, page, &[gz[0], ("range", "bytes=10-19")])
        .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(body_of(r).await, full[10..20].to_vec());

    for (path, why) in [
        ("/z/photo.png?size=5000&ct=image/png", "not text"),
        (
            "/z/raw.txt?size=5000&ct=text/plain&cc=public,max-age%3D60,no-transform",
            "no-transform",
        ),
        ("/z/untyped?size=5000", "no content type"),
    ] {
        let r = edge.request(Method::GET, path, &gz).await;
        assert!(r.headers().get("content-encoding").is_none(), "{why}");
        assert_eq!(body_of(r).await.len(), 5000, "{why}");
    }
    assert_eq!(
        origin.hits("/z/page.html"),
        1,
        "one cache entry served every client"
    );
    let m = edge.metrics().await;
    assert!(
        m.contains(r#"shadowcdn_edge_compressed_responses_total{algorithm="gzip"} 1"#),
        "{m}"
    );
}

/// The origin's own 304 to a conditional request that bypassed the cache (a `no-store` page
/// the edge compressed) carries the weak ETag and the `Vary` its compressed 200 had (RFC 9110
/// §15.4.5), so the client's stored copy is the one it updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_304_for_a_compressed_page_matches_its_200() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let page = "/nc/page.html?size=5000&ct=text/html&etag=n1&cc=no-store";
    let gz = ("accept-encoding", "gzip");
    let r = edge.request(Method::GET, page, &[gz]).await;
    assert_eq!(header(&r, "content-encoding").as_deref(), Some("gzip"));
    assert_eq!(header(&r, "etag").as_deref(), Some("W/\"n1\""));
    let r = edge
        .request(Method::GET, page, &[gz, ("if-none-match", "W/\"n1\"")])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(origin.not_modified(), 1, "the origin's own 304");
    assert_eq!(header(&r, "etag").as_deref(), Some("W/\"n1\""));
    assert!(header(&r, "vary")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .contains("accept-encoding"));
    // Without a coding the 200 was sent as is: its 304 keeps the strong tag.
    let r = edge
        .request(Method::GET, page, &[("if-none-match", "\"n1\"")])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(&r, "etag").as_deref(), Some("\"n1\""));
}

/// `If-Match` and `If-Unmodified-Since` are the origin's to judge: pingora-cache neither
/// answers them from a copy nor passes them on to a fill, so such a request (a download resumed
/// with `Range` and `If-Match`) goes to the origin, precondition and all, and the stored copy
/// is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_if_match_is_the_origins_to_judge() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/pre/file.bin?size=4000&etag=v2";
    assert_eq!(x_cache(&edge.get(path).await), "MISS");
    assert_eq!(x_cache(&edge.get(path).await), "HIT");
    for (name, value) in [
        ("if-match", "\"v1\""),
        ("if-unmodified-since", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ] {
        let r = edge
            .request(
                Method::GET,
                path,
                &[(name, value), ("range", "bytes=100-199")],
            )
            .await;
        assert_ne!(x_cache(&r), "HIT", "{name}");
        let seen = origin.last_headers("/pre/file.bin").unwrap();
        assert_eq!(seen[name], value, "{name} reached the origin");
        assert_eq!(seen["range"], "bytes=100-199");
    }
    assert_eq!(origin.hits("/pre/file.bin"), 3);
    assert_eq!(x_cache(&edge.get(path).await), "HIT", "the copy stays");
}

/// An `Age` past what any cache must count (2^31 seconds, RFC 9111 §1.2.2) is taken as that:
/// the response is stale on arrival, and the client that fetched it still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_age_past_every_limit_is_answered_not_a_crash() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/aged/huge?age=18446744073709551615&delay_ms=1100&size=100";
    let r = edge.get(path).await;
    assert_eq!(r.status(), StatusCode::OK);
    let age: u64 = header(&r, "age").unwrap().parse().unwrap();
    assert!(age >= 1 << 31, "{age}");
    assert_eq!(body_of(r).await.len(), 100);
}

/// An origin row that leaves tracking parameters out of the cache key: requests that differ
/// only in them share one copy (the origin still sees each query), other parameters still
/// split the key, a purge naming the key with such parameters finds the copy, and a host
/// without the option keeps every parameter in its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_query_parameters_share_one_cache_entry() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let row = format!(
        "[[origins]]\nhost = \"q.test\"\nupstream = \"http://{}\"\n\
         cache_key_ignore_query = [\"utm_*\", \"fbclid\"]\n",
        origin.addr
    );
    let edge = start_edge(origin.addr, dir.path(), &row);
    let get = |host: &'static str, path: &'static str| {
        client().get(edge.url(path)).header("host", host).send()
    };
    let q = |path| get("q.test", path);
    assert_eq!(
        x_cache(&q("/page?utm_source=a&id=1").await.unwrap()),
        "MISS"
    );
    assert_eq!(
        origin.last_query("/page").as_deref(),
        Some("utm_source=a&id=1"),
        "the origin gets the whole query"
    );
    for same in [
        "/page?id=1&utm_medium=b",
        "/page?fbclid=x&id=1&utm_campaign=c",
    ] {
        let r = q(same).await.unwrap();
        assert_eq!(x_cache(&r), "HIT", "{same}");
        assert_eq!(body_of(r).await, body_for("/page", 64));
    }
    assert_eq!(
        x_cache(&q("/page?id=2&utm_source=a").await.unwrap()),
        "MISS"
    );
    assert_eq!(x_cache(&q("/page?id=1&fbclidx=1").await.unwrap()), "MISS");
    assert_eq!(origin.hits("/page"), 3);

    // A redirect that strips the ignored parameters is not stored under the key it points
    // to (it would answer that URL with itself).
    let moved = "/moved?utm_source=a&status=301&cc=public,max-age%3D60";
    assert_eq!(
        q(moved).await.unwrap().status(),
        StatusCode::MOVED_PERMANENTLY
    );
    let r = q("/moved?status=301&cc=public,max-age%3D60").await.unwrap();
    assert_eq!(x_cache(&r), "MISS", "the redirect was not stored");

    let r = edge.purge("q.test/page?utm_source=zzz&id=1", TOKEN).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&q("/page?id=1").await.unwrap()), "MISS");

    // A shadow ordered with such parameters marks the copy clients are served.
    let order = serde_json::json!({"key": "q.test/s?utm_source=x", "ttl_secs": 60});
    assert!(shadow_marked(&edge, order).await);
    let (s, v) = admin_json(&edge, Method::GET, "/shadows/q.test/s?fbclid=y", None).await;
    assert_eq!(
        (s, v["key"].as_str()),
        (StatusCode::OK, Some("q.test/s")),
        "{v}"
    );
    let r = q("/s?utm_medium=z").await.unwrap();
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");

    for (path, expected) in [("/p?utm_source=a", "MISS"), ("/p?utm_source=b", "MISS")] {
        assert_eq!(x_cache(&get(HOST, path).await.unwrap()), expected, "{path}");
    }
}

/// A tag purge removes every object of the host whose response named one of the tags
/// (`Surrogate-Key` or `Cache-Tag`, any case), and only those; clients never see the tags;
/// the purge survives a restart and keeps an answer fetched across it out of the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_cache_tag() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "");
    let tagged = [
        "/t/a?skey=Product-42%20home",
        "/t/b?ctag=home,product-42",
        "/t/e?skey=product-42",
    ];
    let kept = ["/t/c?skey=product-7", "/u/d"];
    for p in tagged.iter().chain(&kept) {
        for expected in ["MISS", "HIT"] {
            let r = edge.get(p).await;
            assert_eq!(x_cache(&r), expected, "{p}");
            assert!(r.headers().get("surrogate-key").is_none(), "{p}");
            assert!(r.headers().get("cache-tag").is_none(), "{p}");
        }
    }
    let purge_tags = |body: serde_json::Value, token: &'static str| {
        client()
            .post(format!("http://{}/tags/{HOST}", edge.admin))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let r = purge_tags(json!({ "tags": ["product-42"] }), "wrong")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for bad in [json!({ "tags": [] }), json!({ "tags": ["a b"] })] {
        let r = purge_tags(bad.clone(), TOKEN).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "bad_tags", "{v}");
    }
    let r = purge_tags(json!({ "tagz": ["x"] }), TOKEN).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // A path that does not decode: the token is asked for first, then the path refused.
    let bad_path = format!("http://{}/tags/%FF", edge.admin);
    let r = client().post(&bad_path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client()
        .post(&bad_path)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_path", "{v}");
    assert_eq!(
        x_cache(&edge.get(tagged[0]).await),
        "HIT",
        "refused purges did nothing"
    );

    let r = purge_tags(json!({ "tags": ["PRODUCT-42"] }), TOKEN)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["product-42"]), "{v}");
    for p in &tagged[..2] {
        assert_eq!(x_cache(&edge.get(p).await), "MISS", "{p}");
        assert_eq!(x_cache(&edge.get(p).await), "HIT", "{p} refetched and kept");
    }
    for p in kept {
        assert_eq!(x_cache(&edge.get(p).await), "HIT", "{p}");
    }

    // A tag purge while the tagged answer is on its way: served, not stored.
    let slow = "/t/slow?skey=product-9&delay_ms=2000";
    let purge = async {
        while origin.hits("/t/slow") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        purge_tags(json!({ "tags": ["product-9"] }), TOKEN)
            .await
            .unwrap()
            .status()
    };
    let (r, purged) = tokio::join!(edge.get(slow), purge);
    assert_eq!(purged, StatusCode::OK);
    assert_eq!(x_cache(&r), "BYPASS");
    assert_eq!(x_cache(&edge.get(slow).await), "MISS");

    // A 304 that names new tags: the refreshed copy is found by them.
    let retagged = "/t/retagged?skey_gen=1&etag=v1&cc=max-age%3D1";
    assert_eq!(x_cache(&edge.get(retagged).await), "MISS");
    origin.bump();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(x_cache(&edge.get(retagged).await), "REVALIDATED");
    let r = purge_tags(json!({ "tags": ["gen-1"] }), TOKEN)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        x_cache(&edge.get(retagged).await),
        "MISS",
        "purged by its new tag"
    );

    let metrics = edge.metrics().await;
    assert!(
        metrics.contains(r#"shadowcdn_edge_purges_total{kind="tag",outcome="banned"} 3"#),
        "{metrics}"
    );

    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());
    edge.spawn();
    assert_eq!(
        x_cache(&edge.get(tagged[2]).await),
        "MISS",
        "the ban survives a restart"
    );
    for p in [tagged[0], kept[0]] {
        assert_eq!(x_cache(&edge.get(p).await), "HIT", "{p}");
    }
}

/// A purge that lands while a miss still waits for the origin finds nothing to remove; the
/// answer that then arrives is what it meant to remove: served to its client, not cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_fetch_keeps_its_answer_out_of_the_cache() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let cases = [
        (
            "/inflight/a",
            format!("{HOST}/inflight/a?delay_ms=2000"),
            404,
        ),
        ("/inflight/b", format!("{HOST}/inflight/*"), 200),
    ];
    for (path, target, purge_status) in cases {
        let url = format!("{path}?delay_ms=2000");
        let purge = async {
            while origin.hits(path) == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            edge.purge(&target, TOKEN).await.status()
        };
        let (r, purged) = tokio::join!(edge.get(&url), purge);
        assert_eq!(purged.as_u16(), purge_status, "{target}");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(x_cache(&r), "BYPASS", "not stored");
        assert_eq!(body_of(r).await, body_for(path, 64));
        let again = edge.get(&url).await;
        assert_eq!(
            x_cache(&again),
            "MISS",
            "{target}: the pre-purge answer was cached"
        );
        assert_eq!(origin.hits(path), 2);
        // The answer fetched after the purge is cached as usual.
        assert_eq!(x_cache(&edge.get(&url).await), "HIT");
    }
}

/// Requests waiting on a fill that a purge overlapped share one fetch made after the purge:
/// the refused fill hands the lock on instead of sending each waiter to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_purged_fill_share_one_new_fetch() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let url = "/herd?delay_ms=2000";
    let others = async {
        while origin.hits("/herd") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let waiters = futures::future::join_all((0..8).map(|_| edge.get(url)));
        let purge = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let target = format!("{HOST}/herd?delay_ms=2000");
            edge.purge(&target, TOKEN).await.status()
        };
        tokio::join!(waiters, purge)
    };
    let (first, (waiters, purged)) = tokio::join!(edge.get(url), others);
    assert!(
        purged.is_success() || purged == StatusCode::NOT_FOUND,
        "{purged}"
    );
    assert_eq!(x_cache(&first), "BYPASS", "the purged answer is not stored");
    for r in waiters {
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body_of(r).await, body_for("/herd", 64));
    }
    assert_eq!(
        origin.hits("/herd"),
        2,
        "one fetch before the purge, one after"
    );
    assert_eq!(x_cache(&edge.get(url).await), "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_disk_objects_and_remembers_purges() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "");
    for p in ["/keep?size=50000", "/gone/a", "/gone/b"] {
        edge.get(p).await;
    }
    assert_eq!(
        edge.purge(&format!("{HOST}/gone/*"), TOKEN).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        edge.child.terminate(),
        Some(0),
        "graceful exit:\n{}",
        edge.child.log()
    );

    edge.spawn();
    let r = edge.get("/keep?size=50000").await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(body_of(r).await, body_for("/keep", 50_000));
    assert_eq!(
        origin.hits("/keep"),
        1,
        "served from disk without the origin"
    );
    assert_eq!(
        x_cache(&edge.get("/gone/a").await),
        "MISS",
        "prefix purge survives restart"
    );
}

/// While the cache disk stalls, what only the disk holds is fetched from the origin rather
/// than waited for, what the memory tier holds is still a hit, and once the disk answers it
/// is read again. The hang: the probe file replaced by a FIFO nobody reads, whose open blocks
/// as a write to a hung device does; the objects are on disk only after a restart. The stall
/// limit is 3 s, so that a slow probe fsync of a busy test machine does not read as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_sends_its_objects_requests_to_the_origin_until_it_answers() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "disk_stall_secs = 3");
    for p in ["/during", "/after"] {
        assert_eq!(x_cache(&edge.get(p).await), "MISS");
    }
    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());

    let cache = dir.path().join("cache");
    let fifo = cache.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::rename(&fifo, cache.join("disk-probe")).unwrap();
    edge.spawn();
    let r = edge.get("/during").await;
    assert_eq!(x_cache(&r), "MISS", "not waited for on the stalled disk");
    assert_eq!(body_of(r).await, body_for("/during", 64));
    assert_eq!(origin.hits("/during"), 2);
    assert_eq!(x_cache(&edge.get("/during").await), "HIT", "from memory");
    let skipped = |m: &str| {
        sample(
            m,
            "shadowcdn_edge_disk_reads_skipped_total",
            &["reason=\"stalled\""],
        )
    };
    assert_eq!(skipped(&edge.metrics().await), Some(1.0));

    std::fs::rename(cache.join("disk-probe"), &fifo).unwrap();
    let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
    let admin = edge.admin;
    wait_until(|| async move {
        let r = client().get(format!("http://{admin}/readyz")).send().await;
        r.is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    reader.join().unwrap();
    assert_eq!(
        x_cache(&edge.get("/after").await),
        "HIT",
        "read from disk again"
    );
    assert_eq!(origin.hits("/after"), 1);
    assert_eq!(skipped(&edge.metrics().await), Some(1.0));
}

/// An object larger than foyer's default 16 MiB write buffer reaches the disk tier too
/// (the buffer is sized for the largest object the cache admits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_survives_a_restart() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("SHADOWCDN_EDGE_CACHE__MAX_OBJECT_SIZE", "24 MiB"),
        ("SHADOWCDN_EDGE_CACHE__MEMORY_CAPACITY", "64 MiB"),
        ("SHADOWCDN_EDGE_CACHE__DISK_CAPACITY", "256 MiB"),
    ];
    let origins = [(HOST.to_string(), origin.addr)];
    let mut edge = EdgeProc::start_with_env(dir.path(), "test-edge", &origins, &envs);
    let path = "/large?size=20971520";
    for expected in ["MISS", "HIT"] {
        let r = edge.get(path).await;
        assert_eq!(x_cache(&r), expected);
        assert_eq!(body_of(r).await.len(), 20 << 20);
    }
    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());
    edge.spawn();
    let r = edge.get(path).await;
    assert_eq!(x_cache(&r), "HIT", "from disk");
    assert_eq!(body_of(r).await, body_for("/large", 20 << 20));
    assert_eq!(origin.hits("/large"), 1);
}

/// A purge is durable when it is acknowledged: an edge killed (SIGKILL, no flush) right after
/// purging one key and one prefix serves neither from its disk tier when it comes back.
/// Purges of keys this edge never held leave no disk tombstone: foyer keeps tombstones in a
/// ring (one 4 KiB slot each, 16,384 on this 64 MiB disk), and one per such purge — most of
/// the fleet's purges, on any one edge — wrapped it over the tombstone of an object the edge
/// did remove, which a crash then brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_of_keys_never_held_do_not_bring_a_removed_object_back() {
    use futures::StreamExt;
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "");
    edge.get("/ring/removed").await;
    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());
    edge.spawn();
    assert_eq!(x_cache(&edge.get("/ring/removed").await), "HIT", "on disk");
    let purged = edge.purge(&format!("{HOST}/ring/removed"), TOKEN).await;
    assert_eq!(purged.status(), StatusCode::OK);
    let edge_ref = &edge;
    let statuses: Vec<StatusCode> = futures::stream::iter(0..17_000)
        .map(|i| async move {
            edge_ref
                .purge(&format!("{HOST}/ring/absent-{i}"), TOKEN)
                .await
                .status()
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == StatusCode::NOT_FOUND));
    edge.child.kill();
    edge.spawn();
    assert_eq!(x_cache(&edge.get("/ring/removed").await), "MISS");
    assert_eq!(origin.hits("/ring/removed"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_survive_a_crash_right_after_they_are_acknowledged() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "");
    let paths = ["/crash/key?size=40000", "/crash/dir/a", "/crash/kept"];
    for p in paths {
        edge.get(p).await;
    }
    // A graceful restart puts every object on disk; each is then a disk hit.
    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());
    edge.spawn();
    for p in paths {
        assert_eq!(x_cache(&edge.get(p).await), "HIT", "{p} from disk");
    }
    let purged = edge
        .purge(&format!("{HOST}/crash/key?size=40000"), TOKEN)
        .await;
    assert_eq!(purged.status(), StatusCode::OK);
    let banned = edge.purge(&format!("{HOST}/crash/dir/*"), TOKEN).await;
    assert_eq!(banned.status(), StatusCode::OK);
    edge.child.kill();

    edge.spawn();
    assert_eq!(x_cache(&edge.get("/crash/key?size=40000").await), "MISS");
    assert_eq!(x_cache(&edge.get("/crash/dir/a").await), "MISS");
    assert_eq!(x_cache(&edge.get("/crash/kept").await), "HIT");
    assert_eq!(origin.hits("/crash/key"), 2);
    assert_eq!(origin.hits("/crash/kept"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_objects_pass_through_uncached() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let size = 3 * 1024 * 1024;
    for _ in 0..2 {
        let r = edge.get(&format!("/big?size={size}")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_ne!(x_cache(&r), "HIT");
        assert_eq!(body_of(r).await.len(), size);
    }
    assert_eq!(origin.hits("/big"), 2);
    // Streamed (chunked) bodies turn out too large only while they fill: every client, the
    // ones that share the first fill included, still gets the whole body, and none is cached.
    let path = format!("/bigchunked?size={size}&chunked=1&chunk_delay_ms=2");
    let first = futures::future::join_all((0..3).map(|_| edge.get(&path))).await;
    for r in first {
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body_of(r).await, body_for("/bigchunked", size));
    }
    for _ in 0..2 {
        let r = edge.get(&path).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_ne!(x_cache(&r), "HIT");
        assert_eq!(body_of(r).await, body_for("/bigchunked", size));
    }
    let fetched = origin.hits("/bigchunked");
    assert!((3..=5).contains(&fetched), "{fetched} origin fetches");
    let text = edge.metrics().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("shadowcdn_edge_fill_passthrough_total") && !l.ends_with(" 0")),
        "{text}"
    );
}

/// A client that hangs up early on a body passing through is cut off alone: the clients that
/// share the fill still get all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_from_a_passing_fill_does_not_cut_the_others_off() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // More than the 4 MiB a body passing through may hold for a reader.
    let size = 6 * 1024 * 1024;
    let path = format!("/gone?size={size}&chunked=1&chunk_delay_ms=2");
    // The first client starts the fill, reads a little and stops reading (it stays connected,
    // its reader pinned at the start of the body), then hangs up.
    let mut first = edge.get(&path).await;
    assert_eq!(first.status(), StatusCode::OK);
    first.chunk().await.unwrap().unwrap();
    let others = futures::future::join_all((0..2).map(|_| async {
        let r = edge.get(&path).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.map(|b| b.len())
    }));
    let hang_up = async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(first);
    };
    let (bodies, ()) = tokio::join!(others, hang_up);
    for body in bodies {
        assert_eq!(body.expect("a whole body"), size);
    }
    assert_eq!(origin.hits("/gone"), 1, "the others shared the first fill");
    let text = edge.metrics().await;
    assert!(
        text.contains("shadowcdn_edge_fill_readers_cut_total 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_and_loops_get_json_errors() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let r = client()
        .get(edge.url("/x"))
        .header("host", "nobody.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unknown_host");
    assert!(v["message"].as_str().unwrap().contains("nobody.example"));
    assert_eq!(origin.total(), 0);
    let r = edge.request(Method::TRACE, "/traced", &[]).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "method_not_allowed");
    assert_eq!(origin.total(), 0);
    // CONNECT too, in JSON (Pingora's own refusal has no body).
    let head = format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n");
    let answer = shadowcdn_tests::raw_exchange(edge.addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.contains("\"method_not_allowed\""), "{answer}");
    assert_eq!(origin.total(), 0);

    // A request that already passed through this edge (an origin row pointing back at the
    // CDN) is a loop; one the broker forwarded is not.
    let via = |v: &'static str| {
        client()
            .get(edge.url("/looped"))
            .header("host", HOST)
            .header("via", v)
            .send()
    };
    let r = via("1.1 shadowcdn-broker, 1.1 shadowcdn-test-edge")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::LOOP_DETECTED);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "loop_detected");
    let r = via("1.1 shadowcdn-broker, 1.1 shadowcdn-test-edge-2")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(origin.hits("/looped"), 1);

    // The admin API: a body is read only with the token, and one too large or not JSON is a
    // JSON error naming why.
    // Just over the 2 MiB limit: the client has sent (nearly) all of it when the edge answers.
    let big = vec![b' '; (2 << 20) + 1024];
    let post = |token: &'static str, body: Vec<u8>| {
        client()
            .post(format!("http://{}/shadows", edge.admin))
            .bearer_auth(token)
            .body(body)
            .send()
    };
    let r = post("wrong-token", b"{}".to_vec()).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = post(TOKEN, big).await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "too_large", "{v}");
    let r = post(TOKEN, b"{not json".to_vec()).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "bad_json", "{v}");
    let r = client()
        .get(format!("http://{}/cache/{HOST}/x", edge.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "PURGE, DELETE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // The broker's health probe is answered by the proxy and counted as no request.
    let r = edge.get("/.well-known/shadowcdn-probe").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(origin.hits("/.well-known/shadowcdn-probe"), 0);
    edge.get("/m").await;
    edge.get("/m").await;
    let needles = [
        "shadowcdn_edge_requests_total{cache_status=\"hit\"} 1",
        "shadowcdn_edge_requests_total{cache_status=\"miss\"} 1",
        "shadowcdn_edge_origin_fetches_total{outcome=\"ok\"} 1",
        "shadowcdn_edge_origin_fetch_duration_seconds_count 1",
        "shadowcdn_edge_served_bytes_total",
        "shadowcdn_edge_cache_memory_bytes",
        "shadowcdn_edge_fill_bytes 0",
        "shadowcdn_edge_fill_passthrough_total{reason=\"fill_memory\"} 0",
        "foyer_",
    ];
    // A request is counted when the edge logs it, just after its last byte left: a scrape
    // right after the client has the answer may come first.
    let mut text = String::new();
    for _ in 0..100 {
        text = edge.metrics().await;
        if needles.iter().all(|n| text.contains(n)) {
            assert!(
                !text.contains("shadowcdn_edge_requests_total{cache_status=\"bypass\"} 1"),
                "{text}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing: Vec<_> = needles.iter().filter(|n| !text.contains(*n)).collect();
    panic!("missing {missing:?} in:\n{text}");
}

/// A SIGTERM that comes while the edge is still starting (reading its disk tier) used to kill
/// it: pingora catches signals only once its listeners are up. It now stops gracefully as soon
/// as it is up, and starts again on the same cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_start_up_stops_the_edge_once_it_is_up() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = EdgeProc::start(
        dir.path(),
        "test-edge",
        &[(HOST.to_string(), origin.addr)],
        "",
    );
    edge.get("/kept?size=100").await.bytes().await.unwrap();
    assert_eq!(edge.child.terminate(), Some(0));
    edge.set_env("RUST_LOG", "warn,edge_node::stop_signals=info");
    let edge = tokio::task::spawn_blocking(move || {
        shadowcdn_tests::stopped_while_starting(|| {
            edge.spawn_starting();
            std::mem::replace(&mut edge.child, shadowcdn_tests::Child::placeholder())
        });
        edge.spawn();
        edge
    })
    .await
    .unwrap();
    let again = edge.get("/kept?size=100").await;
    assert_eq!(again.headers()["x-cache"], "HIT");
    assert_eq!(origin.hits("/kept"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut edge = EdgeProc::start_with_env(
        dir.path(),
        "test-edge",
        &[(HOST.to_string(), origin.addr)],
        &[("SHADOWCDN_EDGE_SERVER__ACCESS_LOG", log.to_str().unwrap())],
    );
    for _ in 0..2 {
        edge.get("/logged?size=100").await.bytes().await.unwrap();
    }
    let url = edge.url("/slowterm?delay_ms=1500&size=10000");
    let inflight = tokio::spawn(async move {
        client()
            .get(url)
            .header("host", HOST)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    // The request is at the origin, i.e. in flight on the edge, before SIGTERM.
    wait_until(|| async { origin.hits("/slowterm") > 0 }).await;
    let code = tokio::task::spawn_blocking(move || edge.child.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let body = inflight.await.unwrap();
    assert_eq!(body.to_vec(), body_for("/slowterm", 10_000));
    // Every request has its access line, the one that finished during the drain included.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut seen: Vec<(&str, &str, u64, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["target"].as_str().unwrap(),
                l["cache"].as_str().unwrap(),
                l["status"].as_u64().unwrap(),
                l["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    // Lines are written as requests finish logging, which for the first two may be in either
    // order: the miss logs after its client has the body, and may do so after the hit that
    // client sent next.
    seen.sort();
    assert_eq!(
        seen,
        [
            ("/logged?size=100", "hit", 200, 100),
            ("/logged?size=100", "miss", 200, 100),
            ("/slowterm?delay_ms=1500&size=10000", "miss", 200, 10_000),
        ],
        "{lines:?}"
    );
    let first = &lines[0];
    assert_eq!(
        (
            &first["method"],
            &first["host"],
            &first["node"],
            &first["client"]
        ),
        (
            &serde_json::json!("GET"),
            &serde_json::json!(HOST),
            &serde_json::json!("test-edge"),
            &serde_json::json!("127.0.0.1")
        )
    );
    assert!(first["time_ms"].as_u64().unwrap() > 1_700_000_000_000);
}

#[test]
fn bad_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::get("edge-node");
    let cfg = edge_config(
        "bad",
        dir.path(),
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        &[],
        "memory_capasity = \"1 GiB\"",
    );
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = bin
        .command()
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("memory_capasity"), "{err}");
    // The file named by the flag's variable is read, and the variable is not taken for a key.
    let out = bin
        .command()
        .env("SHADOWCDN_EDGE_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("memory_capasity") && !err.contains("`config`"),
        "{err}"
    );

    let out = bin
        .command()
        .args(["--config", "/definitely/not/here.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // An access log that cannot be opened stops the start, naming the field.
    let good = edge_config(
        "good",
        dir.path(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        &[],
        "",
    );
    let path = dir.path().join("good.toml");
    std::fs::write(&path, good).unwrap();
    let out = bin
        .command()
        .args(["--config", path.to_str().unwrap()])
        .env(
            "SHADOWCDN_EDGE_SERVER__ACCESS_LOG",
            "/definitely/not/here/access.log",
        )
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.access_log"), "{err}");

    // `--preflight` also opens what a start would: the cache directory (writable) and the
    // QUIC certificates; `--check` judges the values alone.
    let run = |flag: &str, envs: &[(&str, &str)]| {
        let mut cmd = bin.command();
        cmd.args(["--config", path.to_str().unwrap(), flag]);
        cmd.envs(envs.iter().copied());
        cmd.output().unwrap()
    };
    let out = run("--preflight", &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cache directory writable"));
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_a_file = file.join("cache");
    let unusable = [("SHADOWCDN_EDGE_CACHE__DIR", under_a_file.to_str().unwrap())];
    assert_eq!(run("--check", &unusable).status.code(), Some(0));
    let out = run("--preflight", &unusable);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.dir"), "{err}");
    let missing_certs = [
        ("SHADOWCDN_EDGE_SYNC__LISTEN", "127.0.0.1:0"),
        (
            "SHADOWCDN_EDGE_SYNC__CA_CERT",
            "/definitely/not/here/ca.pem",
        ),
        ("SHADOWCDN_EDGE_SYNC__CERT", "/definitely/not/here/edge.pem"),
        ("SHADOWCDN_EDGE_SYNC__KEY", "/definitely/not/here/edge.key"),
    ];
    let no_log = [(
        "SHADOWCDN_EDGE_SERVER__ACCESS_LOG",
        "/definitely/not/here/access.log",
    )];
    let out = run("--preflight", &no_log);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.access_log"), "{err}");
    assert_eq!(run("--check", &missing_certs).status.code(), Some(0));
    let out = run("--preflight", &missing_certs);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sync") && err.contains("/definitely/not/here/"),
        "{err}"
    );

    let out = bin.command().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_pushed_at_runtime_take_effect_row_by_row() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let get_pushed = || async {
        client()
            .get(edge.url("/p"))
            .header("host", "pushed.local")
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(get_pushed().await, StatusCode::NOT_FOUND);
    let put = |body: serde_json::Value, token: &'static str| {
        let url = format!("http://{}/origins", edge.admin);
        async move {
            client()
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let good_row =
        serde_json::json!({"host": "pushed.local", "upstream": format!("http://{}", origin.addr)});
    let good = serde_json::json!({"origins": [good_row], "allow_private_upstreams": true});
    assert_eq!(
        put(good.clone(), "wrong-token").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let r = put(good, TOKEN).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["rejected"], serde_json::json!([]), "{v}");
    assert_eq!(get_pushed().await, StatusCode::OK);
    // The test origin is on loopback: without the broker's leave that row is left out, and
    // so is a malformed one, while the rest of the push applies.
    let mixed = serde_json::json!({"origins": [
        {"host": "x.local", "upstream": "ftp://nope"},
        good_row,
        {"host": "other.local", "upstream": "http://93.184.215.14"},
    ]});
    let r = put(mixed, TOKEN).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["origins"], 2, "{v}");
    let rejected = v["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{v}");
    assert_eq!(rejected[0]["host"], "x.local");
    assert!(rejected[0]["error"].as_str().unwrap().contains("upstream"));
    assert_eq!(rejected[1]["host"], "pushed.local");
    assert!(rejected[1]["error"].as_str().unwrap().contains("private"));
    assert_eq!(get_pushed().await, StatusCode::NOT_FOUND);
    let malformed = client()
        .put(format!("http://{}/origins", edge.admin))
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
}

/// An origin row's `registered_at_ms` (the broker's time of the host's registration, read
/// against the push's `sent_at_ms`) hides what the edge cached for the host before then, once
/// per registration: a repeated push changes nothing, whatever the offset of the broker's
/// clock, and the registrations applied survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_registration_time_hides_what_was_cached_for_it_before() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "");
    let push = |edge: &Edge, registered_at_ms: Option<u64>, sent_at_ms: Option<u64>| {
        let mut row = serde_json::json!({"host": "owned.local",
            "upstream": format!("http://{}", origin.addr)});
        if let Some(ms) = registered_at_ms {
            row["registered_at_ms"] = ms.into();
        }
        let mut body = serde_json::json!({"origins": [row], "allow_private_upstreams": true});
        if let Some(ms) = sent_at_ms {
            body["sent_at_ms"] = ms.into();
        }
        let admin = edge.admin;
        async move {
            let r = client()
                .put(format!("http://{admin}/origins"))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["rejected"], serde_json::json!([]), "{v}");
        }
    };
    let get = |edge: &Edge| {
        let url = edge.url("/o");
        async move {
            let r = client()
                .get(url)
                .header("host", "owned.local")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.headers()["x-cache"].to_str().unwrap().to_string()
        }
    };
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    // Each change of registration below starts a few ms after the last store, so the floor
    // it sets is past that object's time.
    let settle = || tokio::time::sleep(Duration::from_millis(5));
    push(&edge, None, None).await;
    assert_eq!(get(&edge).await, "MISS");
    assert_eq!(get(&edge).await, "HIT");
    // First seen, registered an hour before this edge cached the object: the copy stays.
    let sent = now_ms();
    push(&edge, Some(sent - 3_600_000), Some(sent)).await;
    assert_eq!(get(&edge).await, "HIT");
    // Registered anew (another owner): the copy was the previous owner's.
    settle().await;
    let r2 = now_ms();
    push(&edge, Some(r2), Some(r2)).await;
    assert_eq!(get(&edge).await, "MISS");
    assert_eq!(get(&edge).await, "HIT");
    push(&edge, Some(r2), Some(now_ms())).await;
    assert_eq!(get(&edge).await, "HIT", "the same registration again");
    // A broker whose clock runs an hour ahead registers it once more: one flush, and its
    // later pushes keep the copy.
    settle().await;
    let ahead = now_ms() + 3_600_000;
    push(&edge, Some(ahead), Some(ahead)).await;
    assert_eq!(get(&edge).await, "MISS");
    assert_eq!(get(&edge).await, "HIT");
    push(&edge, Some(ahead), Some(now_ms() + 3_600_000)).await;
    assert_eq!(get(&edge).await, "HIT");
    // A time past any clock, without the broker's: now, once.
    settle().await;
    push(&edge, Some(u64::MAX), None).await;
    assert_eq!(get(&edge).await, "MISS");
    assert_eq!(get(&edge).await, "HIT");
    assert_eq!(origin.hits("/o"), 4);
    // After a restart the applied registration is remembered: its push keeps the disk copy.
    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());
    edge.spawn();
    push(&edge, Some(u64::MAX), None).await;
    assert_eq!(get(&edge).await, "HIT");
    assert_eq!(origin.hits("/o"), 4);
    // A new owner whose table cannot be kept for a restart (a directory stands where the
    // file goes): its floor applies, but its registration is not recorded, so the next push
    // still reads as a change of owner (a restart would have restored the older table).
    let saved = dir.path().join("cache").join("pushed-origins.json");
    std::fs::remove_file(&saved).unwrap();
    std::fs::create_dir(&saved).unwrap();
    settle().await;
    let r3 = now_ms();
    push(&edge, Some(r3), Some(r3)).await;
    assert_eq!(get(&edge).await, "MISS");
    settle().await;
    push(&edge, Some(r3), Some(now_ms())).await;
    assert_eq!(get(&edge).await, "MISS", "not recorded: floored again");
    // Kept again: recorded, and the same registration keeps the copy from then on.
    std::fs::remove_dir(&saved).unwrap();
    settle().await;
    push(&edge, Some(r3), Some(now_ms())).await;
    assert_eq!(get(&edge).await, "MISS");
    push(&edge, Some(r3), Some(now_ms())).await;
    assert_eq!(get(&edge).await, "HIT");
}

/// The origin is asked under its own name by default (a bucket or shared host answers only to
/// that), or with `forward_host` under the site's name without the client's port (the port the
/// cache key ignores must not reach the origin and shape a cached answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_gets_its_own_host_or_the_sites_without_a_port() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let r = client()
        .get(edge.url("/own-name"))
        .header("host", format!("{HOST}:6666"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let sent = origin.last_headers("/own-name").unwrap();
    assert_eq!(sent["host"], origin.addr.to_string().as_str());

    let rows = serde_json::json!({"origins": [{"host": "fwd.local", "forward_host": true,
        "upstream": format!("http://{}", origin.addr)}], "allow_private_upstreams": true});
    let (s, v) = admin_json(&edge, Method::PUT, "/origins", Some(rows)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = client()
        .get(edge.url("/forwarded"))
        .header("host", "FWD.local:6666")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        origin.last_headers("/forwarded").unwrap()["host"],
        "fwd.local"
    );
}

/// `X-Forwarded-Proto` reaches the origin only from a trusted proxy (by default loopback and
/// the private ranges, where brokers run); a client outside `server.trusted_proxies` that
/// reaches the edge directly cannot claim HTTPS. The list comes from the environment here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_trusted_proxies_tell_the_origin_the_scheme() {
    let origin = TestOrigin::start().await;
    let claim = [("x-forwarded-proto", "https")];

    let dir = tempfile::tempdir().unwrap();
    let trusting = start_edge(origin.addr, dir.path(), "");
    let r = trusting
        .request(Method::GET, "/proto-trusted", &claim)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let sent = origin.last_headers("/proto-trusted").unwrap();
    assert_eq!(sent["x-forwarded-proto"], "https");
    // Forwarding headers the CDN does not write never reach the origin, whoever sent them.
    let forged = [
        ("forwarded", "for=203.0.113.9;proto=https"),
        ("x-real-ip", "203.0.113.9"),
        ("x-forwarded-host", "evil.test"),
        ("x-forwarded-port", "443"),
    ];
    let r = trusting.request(Method::GET, "/forged", &forged).await;
    assert_eq!(r.status(), StatusCode::OK);
    let sent = origin.last_headers("/forged").unwrap();
    for (name, _) in forged {
        assert!(sent.get(name).is_none(), "{name} reached the origin");
    }

    // Only 127.0.0.2 is a trusted proxy; the test's other requests come from 127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    let strict = EdgeProc::start_with_env(
        dir.path(),
        "strict-edge",
        &[(HOST.to_string(), origin.addr)],
        &[(
            "SHADOWCDN_EDGE_SERVER__TRUSTED_PROXIES",
            "[\"127.0.0.2/32\"]",
        )],
    );
    let r = strict
        .request(Method::GET, "/proto-untrusted", &claim)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let sent = origin.last_headers("/proto-untrusted").unwrap();
    let protos: Vec<_> = sent.get_all("x-forwarded-proto").iter().collect();
    assert_eq!(protos, ["http"]);
    assert_eq!(sent["x-forwarded-for"], "127.0.0.1");

    // An origin that varies by scheme: the untrusted claim is stored as the http variant, so
    // it cannot poison what the trusted proxy's HTTPS clients get.
    let varied = "/proto-varied?vary=x-forwarded-proto";
    let r = strict.request(Method::GET, varied, &claim).await;
    assert_eq!(r.text().await.unwrap(), "variant=http");
    let proxy = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = proxy
        .get(strict.url(varied))
        .header("host", HOST)
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(r.text().await.unwrap(), "variant=https");
}

/// A variant is chosen by every line of a varying header: HTTP/2 clients send each cookie on
/// a line of its own, and users who share the first cookie must not share a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_compares_every_line_of_a_header() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/personal?vary=cookie";
    let get = |user: &'static str| {
        let url = edge.url(path);
        async move {
            client()
                .get(url)
                .header("host", HOST)
                .header("cookie", "consent=1")
                .header("cookie", user)
                .send()
                .await
                .unwrap()
        }
    };
    let r = get("s=alice").await;
    assert_eq!(r.text().await.unwrap(), "variant=consent=1 | s=alice");
    let r = get("s=bob").await;
    assert_ne!(x_cache(&r), "HIT");
    assert_eq!(r.text().await.unwrap(), "variant=consent=1 | s=bob");
    let r = get("s=alice").await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(r.text().await.unwrap(), "variant=consent=1 | s=alice");
}

/// An origin that fails in the middle of a body: the client's connection is cut (it sees an
/// incomplete body, not a complete one with an error appended) and nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_off_by_the_origin_reaches_the_client_as_cut_off() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/cut?size=100000&chunked=1&chunk_delay_ms=100&fail_after=3";
    for _ in 0..2 {
        let r = edge.get(path).await;
        assert_eq!(r.status(), StatusCode::OK);
        let got = r.bytes().await;
        assert!(
            got.is_err(),
            "a complete body of {:?} bytes",
            got.map(|b| b.len())
        );
    }
    assert_eq!(origin.hits("/cut"), 2, "the cut-off body was not cached");
    let r = edge.get("/whole?size=100").await;
    assert_eq!(r.status(), StatusCode::OK);
}

async fn admin_json(
    edge: &Edge,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let mut r = client()
        .request(method, format!("http://{}{path}", edge.admin))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let s = resp.status();
    (s, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// Order a shadow of `key` for a minute; the edge accepts it (the fill runs on).
async fn order_shadow(edge: &Edge, key: &str) {
    let order = serde_json::json!({"key": key, "ttl_secs": 60});
    let (s, v) = admin_json(edge, Method::POST, "/shadows", Some(order)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
}

/// Wait until `key` has a shadow mark on `edge` (its fill done).
async fn wait_marked(edge: &Edge, key: &str) {
    wait_until(|| async {
        let (s, _) = admin_json(edge, Method::GET, &format!("/shadows/{key}"), None).await;
        s == StatusCode::OK
    })
    .await;
}

/// Order a shadow (`order`: the `POST /shadows` body) and whether its mark appeared within
/// 5 s (the fill done).
async fn shadow_marked(edge: &Edge, order: serde_json::Value) -> bool {
    let key = order["key"].as_str().unwrap().to_string();
    let (s, v) = admin_json(edge, Method::POST, "/shadows", Some(order)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    for _ in 0..100 {
        let (s, _) = admin_json(edge, Method::GET, &format!("/shadows/{key}"), None).await;
        if s == StatusCode::OK {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A graceful stop lets a shadow fill under way finish and reports its shadow (ended at the
/// stop, with what its fill moved), and reports the order still queued behind it as dropped
/// unfilled, so the broker settles both instead of counting them live until their TTLs end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_reports_the_fill_under_way_and_the_orders_still_queued() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "[shadow]\nfill_concurrency = 1\n");
    let (slow, queued) = (
        // Under the edge's 5 s origin read timeout with room to spare: a delay at the limit
        // timed the fill out on a loaded machine.
        format!("{HOST}/slowfill?size=5000&delay_ms=3000"),
        format!("{HOST}/queued"),
    );
    order_shadow(&edge, &slow).await;
    wait_until(|| async { origin.hits("/slowfill") == 1 }).await;
    order_shadow(&edge, &queued).await;
    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());
    assert_eq!(origin.hits("/queued"), 0, "never filled");

    let saved = std::fs::read(dir.path().join("cache/shadow-outcomes.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    let outcomes = saved["queued"].as_array().unwrap();
    let of = |key: &str| {
        outcomes
            .iter()
            .find(|o| o["key"] == key)
            .unwrap_or_else(|| panic!("no outcome of {key}: {saved}"))
    };
    let filled = of(&slow);
    assert_eq!(filled["bytes"], 5000, "{filled}\n{}", edge.child.log());
    assert_eq!(filled["failed"], false, "{filled}");
    let dropped = of(&queued);
    assert_eq!(dropped["bytes"], 0, "{dropped}");
    assert_eq!(dropped["removed"], true, "{dropped}");
}

/// A renewal order whose mark ends (its TTL runs out) while the renewal waits behind another
/// fill reports that order once, with the mark's end: its fill, when it runs, places no
/// second mark named by the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_mark_ended_meanwhile_is_reported_once() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut edge = start_edge(origin.addr, dir.path(), "[shadow]\nfill_concurrency = 1\n");
    let key = format!("{HOST}/renewed?size=100");
    let order = |ttl: u64| json!({"key": key, "ttl_secs": ttl});
    // The first mark lives 2 s, time for the steps before its renewal on a loaded machine;
    // the fill ahead takes 4 s, past the renewed mark's end.
    assert!(shadow_marked(&edge, order(2)).await);
    let slow = format!("{HOST}/ahead?size=100&delay_ms=4000");
    order_shadow(&edge, &slow).await;
    wait_until(|| async { origin.hits("/ahead") == 1 }).await;
    // Queued behind the slow fill, it renews the mark for a second, which runs out before
    // the renewal's fill does.
    let (s, v) = admin_json(&edge, Method::POST, "/shadows", Some(order(1))).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    wait_marked(&edge, &slow).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        origin.hits("/renewed"),
        1,
        "nothing fetched for the ended mark"
    );
    assert_eq!(edge.child.terminate(), Some(0), "{}", edge.child.log());
    let saved = std::fs::read(dir.path().join("cache/shadow-outcomes.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    let of_key = saved["queued"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["key"] == key.as_str())
        .count();
    assert_eq!(of_key, 1, "{saved}");
}

/// A shadow fill whose origin answers with a redirect takes it as the answer: it does not
/// fetch where the redirect points (which would also hand that server the fill's internal
/// header), and places no shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_fill_does_not_follow_a_redirect() {
    let origin = TestOrigin::start().await;
    let elsewhere = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let to = format!("http%3A%2F%2F{}%2Fsecret", elsewhere.addr);
    let key = format!("{HOST}/moved?cc=max-age%3D60&location={to}&status=302");
    let (s, v) = admin_json(
        &edge,
        Method::POST,
        "/shadows",
        Some(json!({"key": key, "ttl_secs": 60})),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    for _ in 0..100 {
        if origin.hits("/moved") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.hits("/moved"), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(elsewhere.hits("/secret"), 0, "the redirect was followed");
    let (s, _) = admin_json(&edge, Method::GET, &format!("/shadows/{key}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A shadow order the cache cannot keep (the origin forbids caching, or the body outgrows the
/// object limit while streaming) fails without a mark: nothing is pre-positioned, and the
/// broker hears the order holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_the_cache_cannot_keep_fails_unmarked() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let keys = [
        format!("{HOST}/private.bin?cc=private"),
        // 2 MiB without a Content-Length against the 1 MiB object limit.
        format!("{HOST}/huge.bin?size=2097152&chunked=1"),
    ];
    for key in &keys {
        order_shadow(&edge, key).await;
    }
    let failed = || async {
        let m = edge.metrics().await;
        sample(
            &m,
            "shadowcdn_edge_shadow_fills_total",
            &["outcome=\"failed\""],
        )
        .unwrap_or(0.0)
    };
    for _ in 0..100 {
        if failed().await >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed().await, 2.0);
    for key in &keys {
        let (s, _) = admin_json(&edge, Method::GET, &format!("/shadows/{key}"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{key} was marked");
    }
}

/// An origin that redirects plain HTTP to https without a Vary: the cached redirect is
/// served to plain-HTTP requests only, never to https ones (a redirect loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_https_redirect_is_not_served_to_https_requests() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/r.html?https_redirect=1";
    let edge = &edge;
    let get = |proto: &'static str| async move {
        let headers = [("x-forwarded-proto", proto)];
        edge.request(Method::GET, path, &headers).await
    };
    for want in ["MISS", "HIT"] {
        let r = get("http").await;
        assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(x_cache(&r), want);
    }
    for want in ["MISS", "HIT"] {
        let r = get("https").await;
        assert_eq!(r.status(), StatusCode::OK, "https got the redirect");
        assert_eq!(x_cache(&r), want);
    }
    assert_eq!(origin.hits("/r.html"), 2);
}

/// A shadow unshadowed while its body is still on its way leaves no copy behind: the broker
/// withdrew the order, and nothing marks the copy for it to be removed later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshadowing_a_shadow_while_it_fills_leaves_no_copy() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/withdrawn.bin?size=20000&delay_ms=1500";
    let key = format!("{HOST}{path}");
    order_shadow(&edge, &key).await;
    wait_until(|| async { origin.hits("/withdrawn.bin") == 1 }).await;
    // No mark yet (the fill has not finished): the edge says so, and remembers the drop.
    let (s, v) = admin_json(&edge, Method::DELETE, &format!("/shadows/{key}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    wait_until(|| async {
        let m = edge.metrics().await;
        sample(
            &m,
            "shadowcdn_edge_purges_total",
            &["outcome=\"unshadowed_while_filling\""],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(x_cache(&edge.get(path).await), "MISS", "the copy is gone");
    assert_eq!(origin.hits("/withdrawn.bin"), 2);
}

/// A shadow ordered again after a purge overtook its first fill is placed: the first fill's
/// copy was the purge's to remove, and cleaning up after that fill must not purge the key
/// again under the second order's fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_ordered_again_after_a_purge_overtook_its_fill_is_placed() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // About 2 s of body after the headers.
    let path = "/overtaken.bin?size=131072&chunked=1&chunk_delay_ms=250";
    let key = format!("{HOST}{path}");
    order_shadow(&edge, &key).await;
    wait_until(|| async { origin.hits("/overtaken.bin") == 1 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Purged while the first fill's body streams in, then ordered again.
    let r = edge.purge(&key, TOKEN).await;
    assert!([200, 404].contains(&r.status().as_u16()), "{}", r.status());
    order_shadow(&edge, &key).await;
    wait_marked(&edge, &key).await;
    assert_eq!(x_cache(&edge.get(path).await), "HIT");
    assert_eq!(origin.hits("/overtaken.bin"), 2);
}

/// A shadow unshadowed while it fills and ordered again at once is placed: the copy the first
/// fill brings is left to the second order, not removed under it — whether the second fill
/// starts at once or waits for a worker until the first is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_unshadowed_while_it_fills_and_ordered_again_is_placed() {
    let origin = TestOrigin::start().await;
    for (i, workers) in ["", "[shadow]\nfill_concurrency = 1\n"].iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let edge = start_edge(origin.addr, dir.path(), workers);
        // About 2 s of body after the headers.
        let name = format!("/reordered-{i}.bin");
        let path = format!("{name}?size=131072&chunked=1&chunk_delay_ms=250");
        let key = format!("{HOST}{path}");
        order_shadow(&edge, &key).await;
        wait_until(|| async { origin.hits(&name) == 1 }).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (s, v) = admin_json(&edge, Method::DELETE, &format!("/shadows/{key}"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
        order_shadow(&edge, &key).await;
        wait_marked(&edge, &key).await;
        // Found held by the second order's fill, the copy is still its prefetch.
        let r = edge.get(&path).await;
        assert_eq!(x_cache(&r), "HIT", "{workers}");
        let shadow = r.headers().get("x-shadowcdn-shadow");
        assert_eq!(shadow.map(|v| v.as_bytes()), Some(&b"hit"[..]), "{workers}");
        assert_eq!(
            origin.hits(&name),
            1,
            "{workers}: the second order used the first's copy"
        );
    }
}

/// A shadow order for an object the edge already cached only marks it; dropping the mark
/// leaves the ordinary cache entry, as its expiry would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshadowing_a_copy_cached_before_the_order_keeps_it() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    assert_eq!(x_cache(&edge.get("/held.bin").await), "MISS");
    let key = format!("{HOST}/held.bin");
    let order = serde_json::json!({"key": key, "ttl_secs": 60});
    assert!(
        shadow_marked(&edge, order).await,
        "the order marked the held copy"
    );
    let (s, v) = admin_json(&edge, Method::DELETE, &format!("/shadows/{key}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(x_cache(&edge.get("/held.bin").await), "HIT");
    assert_eq!(origin.hits("/held.bin"), 1);
    // Nothing was fetched for it: no fill bytes counted.
    let m = edge.metrics().await;
    assert_eq!(
        sample(&m, "shadowcdn_edge_shadow_fill_bytes_total", &[]),
        Some(0.0),
        "{m}"
    );

    // A held copy gone stale is revalidated by the fill (a 304), and is still the edge's.
    let path = "/held-stale.bin?cc=max-age%3D1&etag=s1";
    assert_eq!(x_cache(&edge.get(path).await), "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let key = format!("{HOST}{path}");
    let order = serde_json::json!({"key": key, "ttl_secs": 60});
    assert!(shadow_marked(&edge, order).await);
    assert_eq!(origin.not_modified(), 1, "the fill revalidated the copy");
    let (s, v) = admin_json(&edge, Method::DELETE, &format!("/shadows/{key}"), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_ne!(x_cache(&edge.get(path).await), "MISS", "the copy stayed");
    assert_eq!(origin.hits("/held-stale.bin"), 2);
}

/// A tag purge ends the marks of the shadows it bans (their fills kept the tags), and only
/// those; a client served from a shadow while it still streams in counts as its hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_marks_follow_tag_purges_and_count_clients_served_while_filling() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let tagged = format!("{HOST}/sh/a?skey=Product-42");
    let other = format!("{HOST}/sh/b?skey=product-7");
    for key in [&tagged, &other] {
        let order = serde_json::json!({"key": key, "ttl_secs": 60});
        assert!(shadow_marked(&edge, order).await, "{key}");
    }
    let r = client()
        .post(format!("http://{}/tags/{HOST}", edge.admin))
        .bearer_auth(TOKEN)
        .json(&json!({ "tags": ["product-42"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let status = |key: String| {
        let edge = &edge;
        async move {
            admin_json(edge, Method::GET, &format!("/shadows/{key}"), None)
                .await
                .0
        }
    };
    assert_eq!(status(tagged.clone()).await, StatusCode::NOT_FOUND);
    assert_eq!(status(other.clone()).await, StatusCode::OK);

    // 8 chunks of 16 KiB, 250 ms apart: the client arrives mid-fill.
    let path = "/sh/slow.bin?size=131072&chunked=1&chunk_delay_ms=250";
    let key = format!("{HOST}{path}");
    order_shadow(&edge, &key).await;
    // The fill has started.
    wait_until(|| async { origin.hits("/sh/slow.bin") > 0 }).await;
    // The body takes at least 1.75 s to arrive: this request reads it as it streams in.
    assert_eq!(
        status(key.clone()).await,
        StatusCode::NOT_FOUND,
        "still filling"
    );
    let r = edge.get(path).await;
    assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");
    assert_eq!(body_of(r).await, body_for("/sh/slow.bin", 131_072));
    assert_eq!(origin.hits("/sh/slow.bin"), 1, "served from the fill");
    let mut hits = serde_json::Value::Null;
    for _ in 0..100 {
        let (s, m) = admin_json(&edge, Method::GET, &format!("/shadows/{key}"), None).await;
        if s == StatusCode::OK {
            hits = m["hits"].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hits, 1, "the client's read counts for the mark");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadowed_object_makes_the_first_request_a_hit_and_expires_with_its_ttl() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let key = format!("{HOST}/shadow.bin?size=20000");
    let order = serde_json::json!({"key": key, "ttl_secs": 60, "priority": 7});
    assert!(shadow_marked(&edge, order).await, "the shadow was filled");
    assert_eq!(
        origin.hits("/shadow.bin"),
        1,
        "filled before any user asked"
    );
    let r = edge.get("/shadow.bin?size=20000").await;
    assert_eq!(
        x_cache(&r),
        "HIT",
        "the first user request finds the shadow"
    );
    assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");
    assert_eq!(body_of(r).await, body_for("/shadow.bin", 20_000));
    let (_, m) = admin_json(&edge, Method::GET, &format!("/shadows/{key}"), None).await;
    assert_eq!(m["hits"], 1);
    assert_eq!(m["bytes"], 20_000);

    // A shadow nobody asks for expires with its TTL and its object is purged.
    let unused = format!("{HOST}/unused.bin");
    assert!(shadow_marked(&edge, serde_json::json!({"key": unused, "ttl_secs": 1})).await);
    // It outlives its TTL by at most a sweep.
    wait_until(|| async {
        admin_json(&edge, Method::GET, &format!("/shadows/{unused}"), None)
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    assert_eq!(
        x_cache(&edge.get("/unused.bin").await),
        "MISS",
        "wasted shadow was purged"
    );
    let text = edge.metrics().await;
    assert!(
        text.contains("shadowcdn_edge_shadows_expired_total{outcome=\"wasted\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("shadowcdn_edge_shadow_hits_total 1"),
        "{text}"
    );

    // Bad requests are refused with JSON and change nothing.
    let (s, _) = admin_json(
        &edge,
        Method::POST,
        "/shadows",
        Some(serde_json::json!({"key": key, "ttl_secs": 0})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = admin_json(
        &edge,
        Method::POST,
        "/shadows",
        Some(serde_json::json!({"key": "nohost", "ttl_secs": 5})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = admin_json(
        &edge,
        Method::POST,
        "/shadows",
        Some(serde_json::json!({"key": key, "ttl_secs": 5, "extra": 1})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let r = client()
        .post(format!("http://{}/shadows", edge.admin))
        .json(&serde_json::json!({"key": key, "ttl_secs": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// The fields an origin keeps out of the shared copy (`no-cache="Set-Cookie"`) still reach
/// the client whose request fetched them, and no other; the `Age` it arrived with is served
/// on the miss as on the hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetching_client_gets_what_the_shared_copy_leaves_out() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let url = "/session?cc=public%2C%20max-age%3D600%2C%20no-cache%3D%22Set-Cookie%22\
               &set_cookie=sess%3D1&age=100";
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "MISS");
    assert_eq!(header(&r, "set-cookie").as_deref(), Some("sess=1"));
    let age: u64 = header(&r, "age").unwrap().parse().unwrap();
    assert!(age >= 100, "the miss's Age counts the upstream's: {age}");
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(header(&r, "set-cookie"), None, "another client's cookie");
    let age: u64 = header(&r, "age").unwrap().parse().unwrap();
    assert!(age >= 100, "{age}");
    assert_eq!(origin.hits("/session"), 1);
}

/// A 304 updates every field it carries in the stored copy (RFC 9111 §4.3.4), not only the
/// validators and freshness; connection-specific fields of an answer are neither forwarded nor
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_updates_the_stored_fields_and_hop_by_hop_fields_stop_here() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    // Fresh for 3 s after the 304: the HIT after it must not find it stale again on a loaded
    // machine.
    let url = "/updated?cc=max-age%3D3&etag=v1&hdr_gen=x-ver";
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "MISS");
    let first = header(&r, "x-ver").unwrap();
    origin.bump();
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "REVALIDATED");
    let second = header(&r, "x-ver").unwrap();
    assert_ne!(first, second, "the 304's field is served");
    let r = edge.get(url).await;
    assert_eq!(x_cache(&r), "HIT");
    assert_eq!(header(&r, "x-ver"), Some(second), "and stored");
    assert_eq!(origin.not_modified(), 1);

    let url = "/hop?hdr=connection:x-secret|x-secret:1|keep-alive:timeout%3D5|x-kept:1";
    for expected in ["MISS", "HIT"] {
        let r = edge.get(url).await;
        assert_eq!(x_cache(&r), expected);
        assert_eq!(header(&r, "x-secret"), None);
        assert_eq!(header(&r, "keep-alive"), None);
        assert_eq!(header(&r, "x-kept").as_deref(), Some("1"));
    }
}

/// Where pingora's range filter reads a request otherwise than RFC 9110: a suffix that selects
/// no byte is unsatisfiable, `If-Range` matches only a strong tag, and an object the origin
/// sent without its length is cut into ranges once stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_read_as_rfc_9110_says() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/r0.bin?size=100&etag=s";
    edge.get(path).await;
    let r = edge
        .request(Method::GET, path, &[("range", "bytes=-0")])
        .await;
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "content-range").as_deref(), Some("bytes */100"));
    let strong = [("range", "bytes=0-9"), ("if-range", "\"s\"")];
    let r = edge.request(Method::GET, path, &strong).await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    let weak = [("range", "bytes=0-9"), ("if-range", "W/\"s\"")];
    let r = edge.request(Method::GET, path, &weak).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body_of(r).await.len(), 100);
    assert_eq!(origin.hits("/r0.bin"), 1);

    let path = "/chunked.bin?size=50000&chunked=1";
    let full = body_for("/chunked.bin", 50_000);
    assert_eq!(body_of(edge.get(path).await).await, full);
    wait_until(|| async {
        let r = edge
            .request(Method::GET, path, &[("range", "bytes=10-19")])
            .await;
        r.status() == StatusCode::PARTIAL_CONTENT
            && header(&r, "content-range").as_deref() == Some("bytes 10-19/50000")
            && body_of(r).await == full[10..20]
    })
    .await;
    assert_eq!(origin.hits("/chunked.bin"), 1);
}

/// A successful request that may change its target invalidates the stored copy (RFC 9111
/// §4.4); a miswritten lifetime makes an answer stale at once rather than cached for the
/// default TTL; an unasked-for part of an object is never stored as the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_miswritten_lifetimes_and_parts_are_not_served_from_cache() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(origin.addr, dir.path(), "");
    let path = "/item";
    assert_eq!(x_cache(&edge.get(path).await), "MISS");
    assert_eq!(x_cache(&edge.get(path).await), "HIT");
    let r = edge.request(Method::POST, path, &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(x_cache(&edge.get(path).await), "MISS");
    assert_eq!(origin.hits("/item"), 3);
    // One for a URL never cached removes nothing.
    let r = edge.request(Method::POST, "/api/call", &[]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let m = edge.metrics().await;
    assert_eq!(
        sample(&m, "shadowcdn_edge_unsafe_method_invalidations_total", &[]),
        Some(1.0),
        "{m}"
    );

    let path = "/bad-age?cc=max-age%3D-1";
    edge.get(path).await;
    assert_ne!(x_cache(&edge.get(path).await), "HIT");
    assert_eq!(origin.hits("/bad-age"), 2);
    let path = "/bad-age-etag?cc=max-age%3Dabc&etag=b";
    edge.get(path).await;
    assert_eq!(x_cache(&edge.get(path).await), "REVALIDATED");
    assert_eq!(origin.not_modified(), 1);
    // `private` or `no-store` beside it still keeps the answer out of the shared cache.
    let path = "/bad-age-private?cc=private%2C%20max-age%3D-1&etag=p";
    edge.get(path).await;
    edge.get(path).await;
    assert_eq!(origin.hits("/bad-age-private"), 2);
    assert_eq!(origin.not_modified(), 1);
    // A shared cache reads `s-maxage`, so a bad `max-age` beside it does not matter.
    let path = "/bad-age-s-maxage?cc=s-maxage%3D60%2C%20max-age%3D-1";
    edge.get(path).await;
    assert_eq!(x_cache(&edge.get(path).await), "HIT");
    // A lifetime given twice with different values is stale from the start (RFC 9111
    // §4.2.1); pingora alone keeps the later `max-age`, a day here.
    let path = "/twice-age?cc=max-age%3D0%2C%20max-age%3D86400&etag=t";
    edge.get(path).await;
    assert_eq!(x_cache(&edge.get(path).await), "REVALIDATED");
    // Two `Expires` lines: pingora reads neither. Different, they are stale from the start;
    // alike (a proxy that added the field again), they read as one.
    let (a, b) = ("Thu,%2001%20Jan%202099", "Fri,%2002%20Jan%202099");
    let twice = |path: &str, a: &str, b: &str| {
        format!(
            "{path}?cc=none&etag=x&hdr=expires:{a}%2000:00:00%20GMT%7Cexpires:{b}%2000:00:00%20GMT"
        )
    };
    let path = twice("/twice-expires", a, b);
    edge.get(&path).await;
    assert_eq!(x_cache(&edge.get(&path).await), "REVALIDATED");
    let path = twice("/same-expires", a, a);
    edge.get(&path).await;
    assert_eq!(x_cache(&edge.get(&path).await), "HIT");
    assert_eq!(origin.hits("/same-expires"), 1);
    assert_eq!(origin.not_modified(), 3);

    let path = "/part?status=206";
    edge.get(path).await;
    edge.get(path).await;
    assert_eq!(origin.hits("/part"), 2);
}
