//! The broker in front of real edges: routing, failover, standby promotion, the provider API
//! and request monitoring, all as real processes on loopback.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use shadowcdn_tests::cluster::{BrokerProc, EdgeProc, EdgeSpec, Pki, OPERATOR_TOKEN};
use shadowcdn_tests::{client, poll_secs, sample, text, total, wait_secs, wait_until, TestOrigin};

const HOST: &str = "site.test";

struct Cluster {
    edges: Vec<EdgeProc>,
    broker: BrokerProc,
    token: String,
    _dir: tempfile::TempDir,
}

/// eu: eu-a, eu-b active + eu-s standby; us: us-a active; `extra` is added to the broker
/// config. Every node has a certificate from one cluster CA and the broker reaches the edges
/// over QUIC.
fn start_cluster_with(extra: &str) -> Cluster {
    start_cluster_listing(extra, &|a| a.to_string())
}

/// [`start_cluster_with`], the broker's config naming every edge address by `name_of`.
fn start_cluster_listing(extra: &str, name_of: &dyn Fn(std::net::SocketAddr) -> String) -> Cluster {
    start_cluster_naming(extra, &|_, a| name_of(a))
}

/// [`start_cluster_listing`] with `name_of` also given the started edges (to tell their proxy
/// addresses from their admin ones).
fn start_cluster_naming(
    extra: &str,
    name_of: &dyn Fn(&[EdgeProc], std::net::SocketAddr) -> String,
) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let ids = [
        ("eu-a", "eu", "active"),
        ("eu-b", "eu", "active"),
        ("eu-s", "eu", "standby"),
        ("us-a", "us", "active"),
    ];
    let edges: Vec<EdgeProc> = ids
        .iter()
        .map(|(id, _, _)| {
            let certs = pki.issue(id, false);
            EdgeProc::start_with_certs(&dir.path().join(id), id, &[], "", Some(certs))
        })
        .collect();
    let specs: Vec<EdgeSpec<'_>> = ids
        .iter()
        .zip(&edges)
        .map(|((id, region, role), edge)| EdgeSpec {
            id,
            region,
            role,
            edge,
        })
        .collect();
    let broker_certs = pki.issue("broker", true);
    let broker = BrokerProc::start_listing(dir.path(), &specs, extra, Some(&broker_certs), &|a| {
        name_of(&edges, a)
    });
    Cluster {
        edges,
        broker,
        token: String::new(),
        _dir: dir,
    }
}

/// `[planner]` ticking every wall second with the committed LSTM, plus `extra` lines, on a
/// broker clock 300× faster than the wall: the forecaster reads complete 15-minute buckets,
/// so a test's requests reach it once their bucket ends, 3 wall seconds at most. The clock
/// starts 30 days in the past, as a trace replay's does, so nothing may confuse it with the
/// wall clock.
fn lstm_planner(extra: &str) -> String {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/lstm.onnx");
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 30 * 86_400;
    format!(
        "[clock]\nspeedup = 300.0\nstart_unix = {start}\n[planner]\ninterval_secs = 1\nmodel = \"{model}\"\n{extra}"
    )
}

fn start_cluster() -> Cluster {
    start_cluster_with("")
}

async fn api(
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = client().request(method, url).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

impl Cluster {
    /// Create a provider owning HOST → origin, and wait until every edge knows the host.
    async fn register(&mut self, origin: &TestOrigin) {
        let (s, v) = api(
            reqwest::Method::POST,
            self.broker.api("/v1/providers"),
            OPERATOR_TOKEN,
            Some(json!({"name": "acme"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        self.token = v["token"].as_str().unwrap().to_string();
        let (s, v) = api(
            reqwest::Method::PUT,
            self.broker.api(&format!("/v1/origins/{HOST}")),
            &self.token,
            Some(json!({"upstream": format!("http://{}", origin.addr)})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        for e in &self.edges {
            wait_until(|| async {
                client()
                    .get(format!("http://{}/x", e.addr))
                    .header("host", HOST)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() != StatusCode::NOT_FOUND)
            })
            .await;
        }
    }

    async fn get(&self, path: &str, region: &str) -> reqwest::Response {
        client()
            .get(format!("http://{}{}", self.broker.addr, path))
            .header("host", HOST)
            .header("x-client-region", region)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` from edge `i` directly, for the test site.
    async fn on_edge(&self, i: usize, path: &str) -> reqwest::Response {
        client()
            .get(format!("http://{}{path}", self.edges[i].addr))
            .header("host", HOST)
            .send()
            .await
            .expect("edge answers")
    }

    /// `POST path` of the provider API with `body`, as the registered provider; the status
    /// and answer.
    async fn provider_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let url = self.broker.api(path);
        api(reqwest::Method::POST, url, &self.token, Some(body)).await
    }

    /// Post a provider event (`POST /v1/events`) as the registered provider.
    async fn event(&self, body: Value) -> (StatusCode, Value) {
        self.provider_post("/v1/events", body).await
    }

    /// Register a resource (must succeed); returns the API's answer.
    async fn add_resource(&self, body: Value) -> Value {
        let (s, v) = self.provider_post("/v1/resources", body).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }

    /// Purge one path everywhere through the provider API (must succeed).
    async fn purge(&self, path: &str) {
        let (s, v) = self.purge_with(json!({"host": HOST, "path": path})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    /// `POST /v1/purge` with `body` as the provider; the status and answer.
    async fn purge_with(&self, body: Value) -> (StatusCode, Value) {
        self.provider_post("/v1/purge", body).await
    }

    /// The planner's explanation of `key`.
    async fn explain(&self, key: &str) -> Value {
        let url = self.broker.api(&format!("/v1/shadows/explain?key={key}"));
        api(reqwest::Method::GET, url, &self.token, None).await.1
    }

    /// What edge `i`'s admin API answers about a shadow mark for `key` (`None`: no answer).
    async fn shadow_status(&self, i: usize, key: &str) -> Option<StatusCode> {
        client()
            .get(format!("http://{}/shadows/{key}", self.edges[i].admin))
            .bearer_auth(shadowcdn_tests::cluster::EDGE_TOKEN)
            .send()
            .await
            .ok()
            .map(|r| r.status())
    }

    /// Whether edge `i` holds a shadow mark for `key`.
    async fn shadowed_on(&self, i: usize, key: &str) -> bool {
        self.shadow_status(i, key).await == Some(StatusCode::OK)
    }

    /// Whether edge `i` says it holds no shadow mark for `key` (a 404, not an error or no
    /// answer: a broken admin API must not pass for an absent shadow).
    async fn not_shadowed_on(&self, i: usize, key: &str) -> bool {
        self.shadow_status(i, key).await == Some(StatusCode::NOT_FOUND)
    }

    async fn metrics(&self) -> String {
        client()
            .get(self.broker.metrics_url())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The broker's gauge `name` for edge `id`.
    async fn edge_gauge(&self, name: &str, id: &str) -> Option<f64> {
        let edge = format!("edge=\"{id}\"");
        sample(&self.metrics().await, name, &[edge.as_str()])
    }

    /// Purges the broker holds for edge `id` until it confirms them.
    async fn pending_purges(&self, id: &str) -> Option<f64> {
        self.edge_gauge("shadowcdn_broker_edge_pending_purges", id)
            .await
    }

    /// Requests the broker has finished. It records which edge served a request before it
    /// times it, so once this count passes a request, the hint for its key exists.
    async fn logged(&self) -> f64 {
        total(
            &self.metrics().await,
            "shadowcdn_broker_request_duration_seconds_count",
        )
    }

    /// Wait until the broker has finished the requests it was sent before `before` was read
    /// and one more.
    async fn wait_logged_past(&self, before: f64) {
        wait_until(|| async { self.logged().await > before }).await;
    }

    /// Wait until the broker takes edge `id` as up (`shadowcdn_broker_edge_up`): probed
    /// healthy again after a restart, it is routed to and hinted.
    async fn wait_edge_up(&self, id: &str) {
        let edge = format!("edge=\"{id}\"");
        wait_until(|| async {
            sample(&self.metrics().await, "shadowcdn_broker_edge_up", &[&edge]) == Some(1.0)
        })
        .await;
    }

    /// Wait until the broker has pushed edge `i` the three other edges as its peers.
    async fn wait_peers_listed(&self, i: usize) {
        let admin = self.edges[i].admin;
        wait_until(|| async {
            let (_, v) = api(
                reqwest::Method::GET,
                format!("http://{admin}/peers"),
                shadowcdn_tests::cluster::EDGE_TOKEN,
                None,
            )
            .await;
            v["peers"].as_array().is_some_and(|p| p.len() == 3)
        })
        .await;
    }

    /// A us client views `/page/index.html` and then its script four times, so co-access
    /// learns the pair; then the script is purged everywhere, so the next view of the page
    /// has it to shadow again.
    async fn learn_then_purge_the_script(&self) {
        self.browse_in_us(&["/page/index.html", "/page/app.js"], 4)
            .await;
        let (s, v) = self
            .purge_with(json!({"host": HOST, "path": "/page/app.js"}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }

    /// One client in `us` fetches `paths` in order, `times` over, each answered 200; returns
    /// once every request so far reached the monitor, every follower it offered was placed or
    /// turned down, and every order placed so far has ended on its edge, so no order from
    /// these views can still be on its way or filling (one filling across a purge after this
    /// would bring a copy back).
    async fn browse_in_us(&self, paths: &[&str], times: usize) {
        for _ in 0..times {
            for path in paths {
                assert_eq!(self.get(path, "us").await.status(), StatusCode::OK);
            }
        }
        let sent = (paths.len() * times) as f64;
        wait_until(|| async {
            sample(
                &self.metrics().await,
                "shadowcdn_broker_recorded_total",
                &[],
            )
            .is_some_and(|n| n >= sent)
        })
        .await;
        wait_until(|| async {
            let m = self.metrics().await;
            let offered = total(&m, "shadowcdn_broker_coaccess_followers_total");
            let decided = total(&m, "shadowcdn_broker_coaccess_shadows_total");
            let placed = sample(
                &m,
                "shadowcdn_broker_coaccess_shadows_total",
                &["outcome=\"ok\""],
            )
            .unwrap_or(0.0);
            let mut ended = 0.0;
            for e in &self.edges {
                let m = text(format!("http://{}/metrics", e.admin)).await;
                for outcome in ["filled", "dropped", "failed"] {
                    let o = format!("outcome=\"{outcome}\"");
                    ended += sample(&m, "shadowcdn_edge_shadow_fills_total", &[&o]).unwrap_or(0.0);
                }
            }
            decided >= offered && ended >= placed
        })
        .await;
    }
}

/// The planner's last decision for `region` in an explain answer.
fn decision_in(explain: &Value, region: &str) -> Option<Value> {
    explain["decisions"]
        .as_array()?
        .iter()
        .find(|d| d["region"] == region)
        .cloned()
}

fn edge_of(r: &reqwest::Response) -> String {
    r.headers()["x-shadowcdn-edge"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_is_deterministic_and_spreads_keys() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let mut owners: HashMap<String, usize> = HashMap::new();
    for k in 0..60 {
        let path = format!("/obj/{k}");
        let first = edge_of(&c.get(&path, "eu").await);
        let again = edge_of(&c.get(&path, "eu").await);
        assert_eq!(first, again, "same key, same edge");
        *owners.entry(first).or_default() += 1;
    }
    assert_eq!(
        owners.len(),
        2,
        "only the two active eu edges serve eu: {owners:?}"
    );
    assert!(owners.values().all(|n| *n >= 15), "keys spread: {owners:?}");
    assert!(!owners.contains_key("eu-s"));
    // A us client goes to the us edge, and the edge was told the route.
    let r = c.get("/obj/1", "us").await;
    assert_eq!(edge_of(&r), "us-a");
    let sent = origin.last_headers("/obj/1").unwrap();
    assert!(
        sent.get("x-shadowcdn-route").is_none(),
        "route tags stay between broker and edge"
    );
    // Unknown host: JSON 404 from the broker.
    let r = client()
        .get(format!("http://{}/x", c.broker.addr))
        .header("host", "nobody.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "unknown_host");
    // A target too long to keep as a key: JSON 414, nothing recorded or fetched.
    let long = format!("/long/{}", "a".repeat(9000));
    let r = c.get(&long, "eu").await;
    assert_eq!(r.status(), StatusCode::URI_TOO_LONG);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "uri_too_long");
    assert_eq!(origin.hits(&long), 0);
    // TRACE would echo the request (cookies included) back: refused, JSON 405.
    let r = client()
        .request(
            reqwest::Method::TRACE,
            format!("http://{}/traced", c.broker.addr),
        )
        .header("host", HOST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "method_not_allowed");
    assert_eq!(origin.hits("/traced"), 0);
    // CONNECT would make a tunnel of the cache: the same JSON 405, not Pingora's empty one.
    let head = format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n");
    let answer = shadowcdn_tests::raw_exchange(c.broker.addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(answer.contains("\"method_not_allowed\""), "{answer}");
    // The edges' health probe is not a path of the site: a JSON 404, no edge asked.
    let r = c.get("/.well-known/shadowcdn-probe", "eu").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_found");
    // This CDN's own request headers are not a client's to send: none reaches the origin
    // through an edge.
    let r = client()
        .get(format!("http://{}/internal-headers", c.broker.addr))
        .header("host", HOST)
        .header("x-client-region", "eu")
        .header("x-shadowcdn-made-up", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(edge_of(&r), "origin");
    let sent = origin.last_headers("/internal-headers").unwrap();
    assert!(!sent.contains_key("x-shadowcdn-made-up"), "{sent:?}");
    // The refusals are counted, though no edge was chosen (after their answers were sent):
    // the unknown host and the probe path, the long target.
    for (status, n) in [("status=\"404\"", 2.0), ("status=\"414\"", 1.0)] {
        wait_until(|| async {
            let m = c.metrics().await;
            sample(
                &m,
                "shadowcdn_broker_requests_total",
                &["reason=\"refused\"", status],
            ) == Some(n)
        })
        .await;
    }

    // Answers whose header blocks grow past what pingora reads (the edge adds its status
    // lines to the origin's) fail at one hop or another, but they say nothing about the
    // edges' health: none is marked down, so nothing fails over.
    let status_line = |n: usize| {
        let addr = c.broker.addr;
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "GET /pad/{n}?headers={n} HTTP/1.1\r\nHost: {HOST}\r\n\
                 x-client-region: eu\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await.unwrap();
            String::from_utf8_lossy(&head[9..12]).to_string()
        }
    };
    let mut failed = 0;
    for n in 240..=260 {
        failed += usize::from(status_line(n).await != "200");
    }
    assert!(failed > 0, "no header block was too large");
    let m = c.metrics().await;
    for id in ["eu-a", "eu-b", "eu-s", "us-a"] {
        let edge = format!("edge=\"{id}\"");
        assert_ne!(
            sample(&m, "shadowcdn_broker_edge_up", &[edge.as_str()]),
            Some(0.0),
            "{id} marked down: {m}"
        );
    }
    assert!(
        sample(&m, "shadowcdn_broker_failovers_total", &[]).is_none(),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_edge_during_a_stream_of_gets_gives_no_client_errors() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let mut errors = 0;
    let mut served_by = HashMap::<String, usize>::new();
    for i in 0..400 {
        if i == 100 {
            c.edges[0].child.kill();
        }
        let r = c.get(&format!("/stream/{}", i % 40), "eu").await;
        if r.status() != StatusCode::OK {
            errors += 1;
        }
        *served_by.entry(edge_of(&r)).or_default() += 1;
        let _ = r.bytes().await.unwrap();
    }
    assert_eq!(errors, 0, "{served_by:?}");
    let m = c.metrics().await;
    assert!(m.contains("shadowcdn_broker_failovers_total"), "{m}");
}

/// A provider that points its host's origin at the CDN itself gets a clear error for each
/// request, not requests circling broker → edge → broker until a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_points_back_at_the_cdn_is_a_508_not_a_loop() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    // The provider points its host at the broker itself, keeping the site's Host: every miss
    // would go broker → edge → broker → edge → ...
    let (s, v) = api(
        reqwest::Method::PUT,
        c.broker.api(&format!("/v1/origins/{HOST}")),
        &c.token,
        Some(json!({"upstream": format!("http://{}", c.broker.addr), "forward_host": true})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Until every edge has the new origin, a miss may still reach the old one.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    let (status, body) = loop {
        n += 1;
        let r = c.get(&format!("/loop/{n}"), "eu").await;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        if status == StatusCode::LOOP_DETECTED || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, StatusCode::LOOP_DETECTED, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "loop_detected", "{v}");
    assert_eq!(origin.hits(&format!("/loop/{n}")), 0);
}

/// A request that makes edges drop their connection before answering (a query of death) is
/// tried on one more edge, then answered 502; it takes no edge out of routing. Here every
/// edge's proxy port is a listener that answers the broker's probe and drops anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_edges_drop_takes_no_edge_out_of_routing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let dropper = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let drop_addr = dropper.local_addr().unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let counter = dropped.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = dropper.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_head(&mut s, &mut buf).await {
                    if !head.contains("/.well-known/shadowcdn-probe") {
                        counter.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let ok = b"HTTP/1.1 204 No Content\r\n\r\n";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_naming("", &|edges, a| {
        if edges.iter().any(|e| e.addr == a) {
            drop_addr.to_string()
        } else {
            a.to_string()
        }
    });
    c.register(&origin).await;
    let r = c.get("/poison/1", "eu").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].is_string(), "{v}");
    assert_eq!(dropped.load(Ordering::SeqCst), 2, "tried on two edges");
    assert_eq!(origin.hits("/poison/1"), 0);
    let m = c.metrics().await;
    for id in ["eu-a", "eu-b", "eu-s", "us-a"] {
        let up = format!("shadowcdn_broker_edge_up{{edge=\"{id}\"}} 0");
        assert!(!m.contains(&up), "{id} marked down:\n{m}");
    }
}

/// The next request head (bodiless requests only) a fake edge reads from `s`, `buf` holding
/// what came after the last; `None` once the connection ends.
async fn next_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            return Some(head);
        }
        match s.read(&mut chunk).await {
            Ok(n @ 1..) => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A fake edge proxy port: answers the broker's probes (204) and `/fine/…` (200, kept alive),
/// and crashes on anything else: that connection dropped unanswered, the listener closed
/// (later connects refused), every other connection ended at its next request.
async fn crashing_edge() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let crashed = Arc::new(AtomicBool::new(false));
    let gone = Arc::new(tokio::sync::Notify::new());
    let (flag, notify) = (crashed.clone(), gone.clone());
    tokio::spawn(async move {
        loop {
            let mut s = tokio::select! {
                a = listener.accept() => a.unwrap().0,
                _ = notify.notified() => return,
            };
            let (crashed, gone) = (flag.clone(), notify.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_head(&mut s, &mut buf).await {
                    if crashed.load(Ordering::SeqCst) {
                        return;
                    }
                    let answer: &[u8] = if head.contains("/.well-known/shadowcdn-probe") {
                        b"HTTP/1.1 204 No Content\r\n\r\n"
                    } else if head.contains("/fine/") {
                        b"HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 2\r\n\r\nok"
                    } else {
                        crashed.store(true, Ordering::SeqCst);
                        gone.notify_one();
                        return;
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, crashed)
}

/// A query of death that crashes edges reaches two of them at most, even when the broker
/// holds a kept-alive connection to every edge, as it does under steady traffic: a drop on
/// a pooled connection is retried on the same edge (a keep-alive race looks the same), but
/// it counts against the request like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_crashes_edges_over_kept_alive_connections_crashes_two() {
    use std::sync::atomic::Ordering;
    let mut fakes = Vec::new();
    for _ in 0..4 {
        fakes.push(crashing_edge().await);
    }
    let addrs: Vec<std::net::SocketAddr> = fakes.iter().map(|(a, _)| *a).collect();
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_naming(
        "",
        &|edges, a| match edges.iter().position(|e| e.addr == a) {
            Some(i) => addrs[i].to_string(),
            None => a.to_string(),
        },
    );
    c.register(&origin).await;
    // Kept-alive connections to the edges clients in both regions are routed to.
    for i in 0..24 {
        for region in ["eu", "us"] {
            let r = c.get(&format!("/fine/{i}"), region).await;
            assert_eq!(r.status(), StatusCode::OK, "{region} {i}");
        }
    }
    let r = c.get("/poison/1", "eu").await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].is_string(), "{v}");
    let crashed = fakes
        .iter()
        .filter(|(_, c)| c.load(Ordering::SeqCst))
        .count();
    assert_eq!(crashed, 2, "crashed edges");
    assert_eq!(origin.hits("/poison/1"), 0);
}

/// A client that sends a request and hangs up before the answer is no evidence against the
/// edge: it is neither marked down nor retried (pingora reports the client's side through the
/// same error hook as the edge's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_marks_no_edge_down() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(c.broker.addr).await.unwrap();
        let req = format!(
            "GET /hangup/{i}?delay_ms=400 HTTP/1.1\r\nhost: {HOST}\r\nx-client-region: eu\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        // Hang up only once the request is at the origin, i.e. while the broker waits for
        // its edge's answer.
        let path = format!("/hangup/{i}");
        wait_until(|| async { origin.hits(&path) == 1 }).await;
        s.shutdown().await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut sink)).await;
    }
    let m = c.metrics().await;
    assert!(m.contains("shadowcdn_broker_retries_total 0"), "{m}");
    for id in ["eu-a", "eu-b", "eu-s", "us-a"] {
        let up = format!("shadowcdn_broker_edge_up{{edge=\"{id}\"}} 0");
        assert!(!m.contains(&up), "{id} marked down:\n{m}");
    }
}

/// An edge waiting on a slow origin is waited for up to `edge_read_timeout_secs`; then the
/// client gets a JSON 504, the edge stays in routing and no other edge is asked (it would wait
/// on the same origin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_origin_behind_an_edge_is_a_504_not_a_failover() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_with("edge_read_timeout_secs = 1\n");
    c.register(&origin).await;
    let r = c.get("/slow/1?delay_ms=2500", "eu").await;
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "upstream_timeout", "{v}");
    // The edge's own fetch finishes at the origin; nothing else asked for it.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(origin.hits("/slow/1"), 1, "replayed on another edge");
    let m = c.metrics().await;
    assert!(m.contains("shadowcdn_broker_retries_total 0"), "{m}");
    for id in ["eu-a", "eu-b", "eu-s", "us-a"] {
        let up = format!("shadowcdn_broker_edge_up{{edge=\"{id}\"}} 0");
        assert!(!m.contains(&up), "{id} marked down:\n{m}");
    }
    // And the edge that waited serves the object once its fetch is done.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = c.get("/slow/1?delay_ms=2500", "eu").await;
        if r.status() == StatusCode::OK {
            break;
        }
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(std::time::Instant::now() < deadline, "never served");
    }
    assert_eq!(origin.hits("/slow/1"), 1, "served from the first fetch");
}

/// Certificates for `names` (one leaf per entry) from one new CA, written to `dir`; returns
/// the CA's PEM and the `[[tls.certs]]` lines.
fn tls_certs(dir: &std::path::Path, leaves: &[&[&str]]) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let mut lines = String::new();
    for (i, names) in leaves.iter().enumerate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let (c, k) = (
            dir.join(format!("leaf{i}.pem")),
            dir.join(format!("leaf{i}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        lines.push_str(&format!(
            "[[tls.certs]]\ncert = \"{}\"\nkey = \"{}\"\n",
            c.display(),
            k.display()
        ));
    }
    (ca_pem, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_fetch_over_https_with_the_certificate_of_the_name_they_ask_for() {
    let origin = TestOrigin::start().await;
    let certs = tempfile::tempdir().unwrap();
    let (ca, lines) = tls_certs(certs.path(), &[&[HOST], &["*.img.test"]]);
    let port = shadowcdn_tests::process::free_port();
    let mut c = start_cluster_with(&format!("[tls]\nlisten = \"127.0.0.1:{port}\"\n{lines}"));
    c.register(&origin).await;
    let tls: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    // Trusts only the test CA; names resolve to the broker without asking DNS.
    let https = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve(HOST, tls)
        .resolve("a.img.test", tls)
        .build()
        .unwrap();
    let get = |url: String| https.get(url).header("x-client-region", "eu").send();

    let r = get(format!("https://{HOST}:{port}/secure/page.css"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN offers h2");
    assert!(edge_of(&r).starts_with("eu-"), "{}", edge_of(&r));
    let body = r.bytes().await.unwrap();
    assert_eq!(
        &body[..],
        &shadowcdn_tests::origin::body_for("/secure/page.css", 64)[..]
    );
    // The origin learns the scheme and the client: the client's address, then the broker's
    // (the edge's client), both on loopback here, in one line.
    let seen = origin.last_headers("/secure/page.css").unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");
    let chain: Vec<_> = seen.get_all("x-forwarded-for").iter().collect();
    assert_eq!(chain, ["127.0.0.1, 127.0.0.1"]);
    // The same object over plain HTTP is the same cache entry.
    let r = c.get("/secure/page.css", "eu").await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(origin.hits("/secure/page.css"), 1);
    // Over plain HTTP a client's claim of HTTPS is replaced; its own chain is kept in front
    // (the last entries are the ones the origin can trust).
    let r = client()
        .get(format!("http://{}/plain/page.css", c.broker.addr))
        .header("host", HOST)
        .header("x-client-region", "eu")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = origin.last_headers("/plain/page.css").unwrap();
    assert_eq!(seen["x-forwarded-proto"], "http");
    let chain: Vec<_> = seen.get_all("x-forwarded-for").iter().collect();
    assert_eq!(chain, ["203.0.113.9, 127.0.0.1, 127.0.0.1"], "one line");
    // Operators see when each certificate runs out (rcgen's default: 4096-01-01).
    let m = c.metrics().await;
    assert_eq!(
        sample(
            &m,
            "shadowcdn_broker_tls_cert_expiry_timestamp_seconds",
            &[]
        ),
        Some(67_090_118_400.0),
        "{m}"
    );

    // Another name gets its own certificate (the default would fail verification); the
    // broker answers it like any request for an unregistered host.
    let r = get(format!("https://a.img.test:{port}/x.png"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(c.broker.child.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_is_promoted_when_no_active_edge_is_healthy_and_demoted_after() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.edges[0].child.kill();
    c.edges[1].child.kill();
    let r = c.get("/p", "eu").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(edge_of(&r), "eu-s");
    wait_until(|| async {
        c.metrics()
            .await
            .contains("shadowcdn_broker_standby_promotions_total{region=\"eu\"} 1")
    })
    .await;
    // An active edge comes back: the standby is demoted.
    c.edges[0].spawn();
    let active = || async { edge_of(&c.get("/p", "eu").await) == "eu-a" };
    wait_until(active).await;
}

/// An edge whose cache disk hangs stays alive (`/healthz`) but answers `/readyz` 503, so the
/// broker sends its keys to the next edge of the region rather than let clients wait on the
/// disk, and back once the disk answers. The hang: the probe file replaced by a FIFO nobody
/// reads, whose open blocks as a write to a hung device does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_whose_disk_stalls_is_routed_around_until_it_answers() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let owner = edge_of(&c.get("/p", "eu").await);
    let i = c
        .edges
        .iter()
        .position(|e| e.dir.ends_with(&owner))
        .unwrap();
    c.edges[i].child.kill();
    c.edges[i].set_env("SHADOWCDN_EDGE_CACHE__DISK_STALL_SECS", "2");
    c.edges[i].spawn();
    wait_secs(30, || async { edge_of(&c.get("/p", "eu").await) == owner }).await;

    let cache = c.edges[i].dir.join("cache");
    let fifo = cache.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::rename(&fifo, cache.join("disk-probe")).unwrap();
    wait_secs(30, || async {
        let r = c.get("/p", "eu").await;
        r.status() == StatusCode::OK && edge_of(&r) != owner
    })
    .await;
    let admin = c.edges[i].admin;
    let r = client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "disk_stalled", "{v}");
    assert_eq!(v["node_id"], owner.as_str(), "{v}");
    let live = client().get(format!("http://{admin}/healthz")).send().await;
    assert_eq!(live.unwrap().status(), StatusCode::OK, "still alive");
    let m = text(format!("http://{admin}/metrics")).await;
    assert_eq!(
        sample(&m, "shadowcdn_edge_disk_ready", &[]),
        Some(0.0),
        "{m}"
    );

    // The disk answers again: the stuck probe's open meets a reader, the next probe finds a
    // file of its own, and the edge takes its keys back.
    std::fs::rename(cache.join("disk-probe"), &fifo).unwrap();
    let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
    wait_secs(30, || async { edge_of(&c.get("/p", "eu").await) == owner }).await;
    reader.join().unwrap();
    let m = text(format!("http://{admin}/metrics")).await;
    assert_eq!(
        sample(&m, "shadowcdn_edge_disk_ready", &[]),
        Some(1.0),
        "{m}"
    );
}

/// With every edge down the broker asks the origin itself, under the origin's own name as the
/// edges would (not the client's Host with its port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_fallback_addresses_the_origin_by_its_own_name() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    // A provider whose origin sets cookies on everything has them dropped, by the edges
    // (which then cache the responses) and by the fallback alike.
    let (s, v) = api(
        reqwest::Method::PUT,
        c.broker.api(&format!("/v1/origins/{HOST}")),
        &c.token,
        Some(json!({"upstream": format!("http://{}", origin.addr), "strip_set_cookie": true})),
    )
    .await;
    assert_eq!(
        (s, &v["strip_set_cookie"]),
        (StatusCode::OK, &json!(true)),
        "{v}"
    );
    let cookie = "/cookie?set_cookie=sid%3Dalice";
    wait_until(|| async {
        let r = c.get(cookie, "eu").await;
        !r.headers().contains_key("set-cookie") && r.headers()["x-cache"] == "HIT"
    })
    .await;
    for e in &mut c.edges {
        e.child.kill();
    }
    let r = client()
        .get(format!("http://{}/direct", c.broker.addr))
        .header("host", format!("{HOST}:6666"))
        .header("x-client-region", "eu")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(edge_of(&r), "origin");
    let sent = origin.last_headers("/direct").unwrap();
    assert_eq!(sent["host"], origin.addr.to_string().as_str());
    let r = c
        .get("/direct?set_cookie=sid%3Dbob&skey=a&ctag=b", "eu")
        .await;
    assert_eq!(edge_of(&r), "origin");
    for internal in ["set-cookie", "surrogate-key", "cache-tag"] {
        assert!(!r.headers().contains_key(internal), "{internal}");
    }
    // Nor the origin's per-connection fields, or its own cache's status.
    let r = c
        .get(
            "/direct?hdr=connection%3Ax-sess%7Cx-sess%3Aabc%7Cx-cache%3AHIT%7Ccache-status%3Aup%3B%20hit",
            "eu",
        )
        .await;
    assert_eq!(edge_of(&r), "origin");
    for field in ["x-sess", "x-cache", "cache-status"] {
        assert!(
            !r.headers().contains_key(field),
            "{field}: {:?}",
            r.headers()
        );
    }
}

/// With `approve_new_hosts`, a provider's new host is a claim: answered 202, listed for the
/// operator and for its provider, served nowhere, and no other provider can claim it; once
/// the operator approves it, it is served like any host. A rejected claim is gone, and so is
/// one its provider withdraws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_host_is_served_only_once_the_operator_approves_it() {
    use reqwest::Method;
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_with("admin.approve_new_hosts = true\n");
    let new_provider = |name: &'static str| {
        let url = c.broker.api("/v1/providers");
        async move {
            let (s, v) = api(
                Method::POST,
                url,
                OPERATOR_TOKEN,
                Some(json!({ "name": name })),
            )
            .await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            v["token"].as_str().unwrap().to_string()
        }
    };
    let (acme, other) = (new_provider("acme").await, new_provider("other").await);
    let upstream = json!({ "upstream": format!("http://{}", origin.addr) });
    let put = |token: &str, host: &str| {
        let url = c.broker.api(&format!("/v1/origins/{host}"));
        let (token, body) = (token.to_string(), upstream.clone());
        async move { api(Method::PUT, url, &token, Some(body)).await }
    };
    let operator =
        |method: Method, path: &str| api(method, c.broker.api(path), OPERATOR_TOKEN, None);

    let (s, v) = put(&acme, HOST).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::ACCEPTED, Some("pending_approval")),
        "{v}"
    );
    let (s, v) = put(&other, HOST).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (_, v) = api(Method::GET, c.broker.api("/v1/origins"), &acme, None).await;
    assert_eq!(v["origins"], json!([]), "{v}");
    assert_eq!(v["claims"][0]["host"], HOST, "{v}");
    let (s, _) = api(Method::GET, c.broker.api("/v1/host-claims"), &acme, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "claims are the operator's");
    let (s, v) = operator(Method::GET, "/v1/host-claims").await;
    assert_eq!(
        (s, v["claims"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1)),
        "{v}"
    );
    let m = c.metrics().await;
    assert!(m.contains("shadowcdn_broker_host_claims 1"), "{m}");
    let r = c.get("/claimed.js", "eu").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        origin.hits("/claimed.js"),
        0,
        "not served while it awaits approval"
    );

    // The operator's CLI lists and approves.
    let cli = |args: &[&str]| {
        let out = shadowcdn_tests::Binary::get("broker")
            .command()
            .args(["api", "--api", &c.broker.api(""), "--token", OPERATOR_TOKEN])
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        serde_json::from_str::<Value>(&stdout).unwrap()
    };
    assert_eq!(cli(&["host-claims"])["claims"][0]["host"], HOST);
    let v = cli(&["approve-host", HOST]);
    assert_eq!(v["upstream"], upstream["upstream"], "{v}");
    let approve = format!("/v1/host-claims/{HOST}/approve");
    wait_until(|| async { c.get("/claimed.js", "eu").await.status() == StatusCode::OK }).await;
    let (s, _) = operator(Method::POST, &approve).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "approved once");
    let (_, v) = api(Method::GET, c.broker.api("/v1/origins"), &acme, None).await;
    assert_eq!(
        (v["origins"][0]["host"].as_str(), &v["claims"]),
        (Some(HOST), &json!([])),
        "{v}"
    );

    // Rejected by the operator; withdrawn by its provider.
    for (host, token) in [
        ("rejected.test", OPERATOR_TOKEN),
        ("withdrawn.test", other.as_str()),
    ] {
        let (s, v) = put(&other, host).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        let path = if token == OPERATOR_TOKEN {
            format!("/v1/host-claims/{host}")
        } else {
            format!("/v1/origins/{host}")
        };
        let (s, v) = api(Method::DELETE, c.broker.api(&path), token, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{host}: {v}");
    }
    let (_, v) = operator(Method::GET, "/v1/host-claims").await;
    assert_eq!(v["claims"], json!([]), "{v}");
    let m = c.metrics().await;
    assert!(m.contains("shadowcdn_broker_host_claims 0"), "{m}");

    // A claim is judged again when approved: made while private upstreams were allowed, it is
    // refused once they are not, and stays pending for the operator to reject.
    let (s, v) = put(&other, "late.test").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    c.broker.child.terminate();
    c.broker
        .spawn_with_env(&[("SHADOWCDN_BROKER_ADMIN__ALLOW_PRIVATE_UPSTREAMS", "false")]);
    let approve = c.broker.api("/v1/host-claims/late.test/approve");
    let (s, v) = api(Method::POST, approve, OPERATOR_TOKEN, None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["message"].as_str().unwrap().contains("upstream"), "{v}");
    let claims = c.broker.api("/v1/host-claims");
    let (_, v) = api(Method::GET, claims, OPERATOR_TOKEN, None).await;
    assert_eq!(v["claims"][0]["host"], "late.test", "{v}");
}

/// A host registered with `cache_key_ignore_query` is keyed without those parameters by the
/// broker (so requests that differ only in them reach the same edge) and by the edges (which
/// learn the option with the origin push); a purge naming such a parameter finds the copy; a
/// malformed name is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_query_parameters_route_and_cache_as_one() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let upstream = format!("http://{}", origin.addr);
    let put = |names: Value| {
        api(
            reqwest::Method::PUT,
            c.broker.api(&format!("/v1/origins/{HOST}")),
            &c.token,
            Some(json!({"upstream": upstream, "cache_key_ignore_query": names})),
        )
    };
    let (s, v) = put(json!(["a=b"])).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cache_key_ignore_query"),
        "{v}"
    );
    let (s, v) = put(json!(["utm_*"])).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["cache_key_ignore_query"], json!(["utm_*"]));

    let n = AtomicUsize::new(0);
    let fresh = || format!("/ck?id=1&utm_source=s{}", n.fetch_add(1, Ordering::Relaxed));
    wait_until(|| async { c.get(&fresh(), "eu").await.headers()["x-cache"] == "HIT" }).await;
    let fetched = origin.hits("/ck");
    let mut served_by = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = c.get(&fresh(), "eu").await;
        assert_eq!(r.headers()["x-cache"], "HIT");
        served_by.insert(edge_of(&r));
    }
    assert_eq!(served_by.len(), 1, "one edge holds the key: {served_by:?}");
    assert_eq!(origin.hits("/ck"), fetched);

    let (s, v) = c
        .purge_with(json!({"host": HOST, "path": "/ck?utm_source=zz&id=1"}))
        .await;
    assert_eq!(
        (s, &v["target"]),
        (StatusCode::OK, &json!(format!("{HOST}/ck?id=1"))),
        "{v}"
    );
    assert_eq!(c.get("/ck?id=1", "eu").await.headers()["x-cache"], "MISS");
    // An exact path whose key would end in '*' would read as a prefix at the edges.
    let (s, v) = c
        .purge_with(json!({"host": HOST, "path": "/ck?x=*&utm_source=1"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
}

/// A broker without QUIC credentials orders purges over each edge's admin API: key and tag
/// purges reach every edge that way too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_reach_edges_without_quic_over_their_admin_api() {
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ids = [("eu-a", "eu"), ("us-a", "us")];
    let edges: Vec<EdgeProc> = ids
        .iter()
        .map(|(id, _)| EdgeProc::start(&dir.path().join(id), id, &[], ""))
        .collect();
    let specs: Vec<EdgeSpec<'_>> = ids
        .iter()
        .zip(&edges)
        .map(|((id, region), edge)| EdgeSpec {
            id,
            region,
            role: "active",
            edge,
        })
        .collect();
    let broker = BrokerProc::start(dir.path(), &specs, "");
    drop(specs);
    let mut c = Cluster {
        edges,
        broker,
        token: String::new(),
        _dir: dir,
    };
    c.register(&origin).await;
    let paths = ["/h/a?skey=t1", "/h/b"];
    for i in 0..c.edges.len() {
        for p in paths {
            for _ in 0..2 {
                c.on_edge(i, p).await;
            }
        }
    }
    let x_cache = |i: usize, p: &'static str| {
        let c = &c;
        async move {
            let r = c.on_edge(i, p).await;
            r.headers()["x-cache"].to_str().unwrap().to_string()
        }
    };
    for (body, gone) in [
        (json!({"host": HOST, "tags": ["T1"]}), paths[0]),
        (json!({"host": HOST, "path": "/h/b"}), paths[1]),
    ] {
        let (s, v) = api(
            reqwest::Method::POST,
            c.broker.api("/v1/purge"),
            &c.token,
            Some(body),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert!(
            v["edges"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["ok"] == true),
            "{v}"
        );
        for i in 0..c.edges.len() {
            assert_eq!(x_cache(i, gone).await, "MISS", "{gone} on edge {i}");
        }
    }
}

/// A provider purges by cache tag: every edge drops the host's objects whose response named
/// one of the tags, keeps the others, and each tag costs one purge of the provider's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_reaches_every_edge_and_costs_a_purge_per_tag() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_with("[admin.rate_limits]\npurges_per_minute = 4\n");
    // Taken before: the registration's purge spent its token when it was sent.
    let registered = std::time::Instant::now();
    c.register(&origin).await;
    let tagged = ["/tag/a?skey=sale%20x", "/tag/b?ctag=shoes,Sale"];
    let kept = "/tag/c?skey=other";
    for i in 0..c.edges.len() {
        for p in tagged.iter().chain([&kept]) {
            c.on_edge(i, p).await;
            let r = c.on_edge(i, p).await;
            assert_eq!(r.headers()["x-cache"], "HIT", "{p} on edge {i}");
        }
    }
    let purge = |body: Value| {
        api(
            reqwest::Method::POST,
            c.broker.api("/v1/purge"),
            &c.token,
            Some(body),
        )
    };
    let (s, v) = purge(json!({"host": HOST, "tags": ["sale"], "path": "/tag/a"})).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid")),
        "{v}"
    );
    let (s, v) = purge(json!({"host": HOST, "tags": ["SALE", "gone"]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["tags"], json!(["sale", "gone"]));
    let edges = v["edges"].as_array().unwrap();
    assert_eq!(edges.len(), c.edges.len(), "{v}");
    assert!(edges.iter().all(|e| e["ok"] == true), "{v}");
    for i in 0..c.edges.len() {
        for p in tagged {
            let r = c.on_edge(i, p).await;
            assert_eq!(r.headers()["x-cache"], "MISS", "{p} on edge {i}");
        }
        let r = c.on_edge(i, kept).await;
        assert_eq!(r.headers()["x-cache"], "HIT", "{kept} on edge {i}");
    }
    // Registering the host (it purges the host everywhere), the refused call and the two
    // tags spent the budget of 4 (one comes back every 15 s: a slow machine may have
    // earned it back since the registration).
    let (s, v) = purge(json!({"host": HOST, "tags": ["other"]})).await;
    if registered.elapsed() < Duration::from_secs(13) {
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    }
}

/// With every edge down the broker asks the origin itself; an origin that closed a pooled
/// connection just as the broker reused it (a keep-alive race, no answer) gets the request
/// again on a fresh connection rather than the client getting a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_fallback_survives_a_keep_alive_race() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    for e in &mut c.edges {
        e.child.kill();
    }
    // An origin that answers the first request on each connection and drops the connection
    // at the second one without a word.
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = raw.local_addr().unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = answered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = raw.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "ok";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncache-control: no-store\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // The next request on this connection is read, then dropped unanswered.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let (s, v) = api(
        reqwest::Method::PUT,
        c.broker.api(&format!("/v1/origins/{HOST}")),
        &c.token,
        Some(json!({"upstream": format!("http://{raw_addr}")})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for i in 0..3 {
        let r = c.get(&format!("/race/{i}"), "eu").await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        assert_eq!(edge_of(&r), "origin");
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 3);
}

/// A broker that starts on a registry that is new and empty (its data directory lost,
/// unmounted or mistyped) does not push an empty origin table: the edges keep serving the
/// hosts registered before, rather than all answering 404 within one push interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_empty_registry_does_not_wipe_the_edges_origin_tables() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    wait_until(|| async {
        let mut all = true;
        for i in 0..c.edges.len() {
            all &= c.on_edge(i, "/kept").await.status() == StatusCode::OK;
        }
        all
    })
    .await;
    c.broker.child.kill();
    std::fs::remove_file(c._dir.path().join("data").join("registry.redb")).unwrap();
    c.broker.spawn();
    // Past two push rounds (every 3 s) of the new broker.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for i in 0..c.edges.len() {
        assert_eq!(
            c.on_edge(i, "/kept").await.status(),
            StatusCode::OK,
            "edge {i} lost the host"
        );
    }
}

/// An edge restarted with another admin token (a rotation begun on its side) refuses the
/// broker's origin table and its `GET /origins` alike. A host registered since is kept off it
/// (its region's clients are served by a neighbour instead of a 404), the hosts it took before
/// stay on it, and a broker restarted meanwhile still knows which table the edge took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_registered_while_an_edge_refuses_the_token_is_kept_off_it() {
    let origin = TestOrigin::start().await;
    let other = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    // The broker has recorded the table the edge took.
    let taken = c._dir.path().join("data").join("edge-tables.json");
    wait_until(|| async {
        let saved = std::fs::read(&taken).unwrap_or_default();
        let saved: Value = serde_json::from_slice(&saved).unwrap_or_default();
        saved["edges"].get("us-a").is_some()
    })
    .await;
    let us = 3;
    c.edges[us].child.kill();
    c.edges[us].set_env("SHADOWCDN_EDGE_ADMIN__TOKEN", "rotated-on-the-edge-only");
    c.edges[us].spawn();
    let refused = "shadowcdn_broker_edge_origin_table_refused";
    wait_until(|| async { c.edge_gauge(refused, "us-a").await == Some(1.0) }).await;
    let (s, v) = api(
        reqwest::Method::PUT,
        c.broker.api("/v1/origins/other.test"),
        &c.token,
        Some(json!({"upstream": format!("http://{}", other.addr)})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let broker = c.broker.addr;
    let fetch = |host: &'static str| {
        let url = format!("http://{broker}/a");
        async move {
            let r = client()
                .get(url)
                .header("host", host)
                .header("x-client-region", "us")
                .send()
                .await
                .unwrap();
            (r.status(), edge_of(&r))
        }
    };
    let hosts_off = "shadowcdn_broker_edge_hosts_off";
    for round in ["before", "after"] {
        wait_until(|| async { c.edge_gauge(hosts_off, "us-a").await == Some(1.0) }).await;
        wait_until(|| async { fetch(HOST).await == (StatusCode::OK, "us-a".to_string()) }).await;
        wait_until(|| async { fetch("other.test").await.0 == StatusCode::OK }).await;
        for _ in 0..5 {
            let (status, edge) = fetch("other.test").await;
            assert_eq!(status, StatusCode::OK, "{round} the broker's restart");
            assert_ne!(edge, "us-a", "{round} the broker's restart");
            assert_eq!(fetch(HOST).await, (StatusCode::OK, "us-a".to_string()));
        }
        if round == "before" {
            c.broker.child.kill();
            c.broker.spawn();
            wait_until(|| async { c.edge_gauge(refused, "us-a").await == Some(1.0) }).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_survives_sigkill() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let (s, res) = api(
        reqwest::Method::POST,
        c.broker.api("/v1/resources"),
        &c.token,
        Some(json!({"host": HOST, "path": "/video/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 600,
                    "policy": {"max_copies": 3, "allowed_regions": ["eu"]}})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{res}");
    c.broker.child.kill();
    c.broker.spawn();
    let (s, v) = api(
        reqwest::Method::GET,
        c.broker.api("/v1/resources"),
        &c.token,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["resources"][0], res);
    let (s, v) = api(
        reqwest::Method::GET,
        c.broker.api("/v1/origins"),
        &c.token,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["origins"][0]["host"], HOST);
    assert_eq!(c.get("/after-restart", "eu").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_cannot_touch_each_others_hosts_and_resources() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let (_, res) = api(
        reqwest::Method::POST,
        c.broker.api("/v1/resources"),
        &c.token,
        Some(json!({"host": HOST, "path": "/a"})),
    )
    .await;
    let id = res["id"].as_str().unwrap().to_string();
    let (_, other) = api(
        reqwest::Method::POST,
        c.broker.api("/v1/providers"),
        OPERATOR_TOKEN,
        Some(json!({"name": "mallory"})),
    )
    .await;
    let t = other["token"].as_str().unwrap().to_string();
    let calls = [
        (
            reqwest::Method::PUT,
            format!("/v1/origins/{HOST}"),
            Some(json!({"upstream": "http://127.0.0.1:1"})),
        ),
        // Refused before its upstream is looked up: not a 422 "does not resolve".
        (
            reqwest::Method::PUT,
            format!("/v1/origins/{HOST}"),
            Some(json!({"upstream": "http://nx.invalid"})),
        ),
        (reqwest::Method::DELETE, format!("/v1/origins/{HOST}"), None),
        (reqwest::Method::GET, format!("/v1/resources/{id}"), None),
        (
            reqwest::Method::PUT,
            format!("/v1/resources/{id}"),
            Some(json!({"host": HOST, "path": "/b"})),
        ),
        (reqwest::Method::DELETE, format!("/v1/resources/{id}"), None),
        (
            reqwest::Method::POST,
            "/v1/resources".to_string(),
            Some(json!({"host": HOST, "path": "/c"})),
        ),
        (
            reqwest::Method::POST,
            "/v1/purge".to_string(),
            Some(json!({"host": HOST, "path": "/a"})),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/series?resource={HOST}/a"),
            None,
        ),
    ];
    for (m, path, body) in calls {
        let (s, v) = api(m.clone(), c.broker.api(&path), &t, body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{m} {path}: {v}");
        assert_eq!(v["error"], "forbidden");
    }
    // No token is 401 whatever the query; a missing query is a JSON 400.
    for path in ["/v1/series", "/v1/shadows/explain"] {
        let r = client().get(c.broker.api(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let (s, v) = api(reqwest::Method::GET, c.broker.api(path), &c.token, None).await;
        assert_eq!(
            (s, &v["error"]),
            (StatusCode::BAD_REQUEST, &json!("bad_query")),
            "{path}: {v}"
        );
    }
    // A resource selects requests by path: one with a query would never match.
    let (s, v) = api(
        reqwest::Method::POST,
        c.broker.api("/v1/resources"),
        &c.token,
        Some(json!({"host": HOST, "path": "/a?v=2"})),
    )
    .await;
    assert_eq!(
        (s, &v["error"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!("invalid")),
        "{v}"
    );
    let (_, v) = api(
        reqwest::Method::GET,
        c.broker.api("/v1/resources"),
        &t,
        None,
    )
    .await;
    assert_eq!(v["resources"], json!([]));
    let (s, _) = api(
        reqwest::Method::GET,
        c.broker.api(&format!("/v1/resources/{id}")),
        &c.token,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the owner still has it");
    // A provider token is not an operator token.
    let (s, _) = api(
        reqwest::Method::POST,
        c.broker.api("/v1/providers"),
        &t,
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The metrics carry every provider's spend: on the API listener they are the operator's;
    // the scraper's own listener needs no token.
    let metrics = c.broker.api("/metrics");
    for (token, want) in [
        ("", StatusCode::UNAUTHORIZED),
        ("nobody-holds-this-token", StatusCode::UNAUTHORIZED),
        (t.as_str(), StatusCode::FORBIDDEN),
        (OPERATOR_TOKEN, StatusCode::OK),
    ] {
        let mut r = client().get(&metrics);
        if !token.is_empty() {
            r = r.bearer_auth(token);
        }
        assert_eq!(r.send().await.unwrap().status(), want, "token {token:?}");
    }
    assert!(c
        .metrics()
        .await
        .contains("shadowcdn_broker_api_calls_total"));
    // Only the operator replaces a provider's token; the old one stops working at once.
    let rotate = format!("/v1/providers/{}/token", other["id"].as_str().unwrap());
    let (s, _) = api(reqwest::Method::POST, c.broker.api(&rotate), &t, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = api(
        reqwest::Method::POST,
        c.broker.api(&rotate),
        OPERATOR_TOKEN,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let listing = c.broker.api("/v1/resources");
    let (s, _) = api(reqwest::Method::GET, listing.clone(), &t, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "the old token");
    let t = v["token"].as_str().unwrap().to_string();
    let (s, _) = api(reqwest::Method::GET, listing, &t, None).await;
    assert_eq!(s, StatusCode::OK);
    let missing = c.broker.api("/v1/providers/p-000000000000/token");
    let (s, v) = api(reqwest::Method::POST, missing, OPERATOR_TOKEN, None).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{v}"
    );
    // A host its owner deletes takes its cached copies with it: whoever registers the host
    // next is served from their own origin, never the previous owner's content — even from
    // an edge that was down both when the host was deleted and when it was registered again
    // (it learns the registration's time with the origin table and drops older copies).
    assert_eq!(c.get("/a", "eu").await.status(), StatusCode::OK);
    let r = c.get("/a", "eu").await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    let holder = edge_of(&r);
    let down = ["eu-a", "eu-b", "eu-s", "us-a"]
        .iter()
        .position(|id| *id == holder)
        .unwrap();
    assert_eq!(c.edges[down].child.terminate(), Some(0));
    let series_total = |token: String| {
        let url = c.broker.api(&format!("/v1/series?resource={HOST}/a"));
        async move {
            let (s, v) = api(reqwest::Method::GET, url, &token, None).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let regions = v["regions"].as_object().unwrap().values();
            let buckets = regions.flat_map(|r| r["buckets"].as_array().unwrap().iter());
            buckets
                .map(|b| b["requests"].as_u64().unwrap())
                .sum::<u64>()
        }
    };
    wait_until(|| async { series_total(c.token.clone()).await >= 2 }).await;
    // The query is keyed as requests are: a host spelt in capitals finds the same series.
    let upper = c
        .broker
        .api(&format!("/v1/series?resource={}/a", HOST.to_uppercase()));
    let (s, v) = api(reqwest::Method::GET, upper, &c.token, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["resource"], format!("{HOST}/a"), "{v}");
    assert!(!v["regions"].as_object().unwrap().is_empty(), "{v}");
    // A purge some edge could not confirm: the CLI says so with exit code 3.
    let out = shadowcdn_tests::Binary::get("broker")
        .command()
        .args(["api", "--api", &c.broker.api(""), "--token", &c.token])
        .args(["purge", "--host", HOST, "--prefix", "/"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("did not confirm"), "{stderr}");
    let (s, v) = api(
        reqwest::Method::DELETE,
        c.broker.api(&format!("/v1/origins/{HOST}")),
        &c.token,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    assert!(
        v["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["edge"] == holder.as_str() && e["ok"] == false),
        "{v}"
    );
    let theirs = TestOrigin::start().await;
    let (s, v) = api(
        reqwest::Method::PUT,
        c.broker.api(&format!("/v1/origins/{HOST}")),
        &t,
        Some(json!({"upstream": format!("http://{}", theirs.addr)})),
    )
    .await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "the edge is still down: {v}");
    assert_eq!(
        series_total(t.clone()).await,
        0,
        "the previous owner's history"
    );
    assert!(
        v["purge"]["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["edge"] == holder.as_str() && e["ok"] == false),
        "{v}"
    );
    c.edges[down].spawn();
    c.wait_edge_up(&holder).await;
    wait_until(|| async {
        let r = c.get("/a", "eu").await;
        r.status() == StatusCode::OK && edge_of(&r) == holder
    })
    .await;
    assert_eq!(theirs.hits("/a"), 1, "served the previous owner's copy");
    assert_eq!(origin.hits("/a"), 1);
}

/// A purge an edge misses (it is down) is queued for it, durably: the broker restarts, the
/// edge comes back with the purged copy on its disk, and it gets the purge before it serves
/// a request again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_an_edge_missed_reaches_it_before_it_serves_again() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let path = "/missed.css";
    assert_eq!(c.get(path, "eu").await.status(), StatusCode::OK);
    let r = c.get(path, "eu").await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    let holder = edge_of(&r);
    let down = c
        .edges
        .iter()
        .position(|e| e.dir.ends_with(&holder))
        .unwrap();
    assert_eq!(c.edges[down].child.terminate(), Some(0));

    let (s, v) = c.purge_with(json!({"host": HOST, "path": path})).await;
    assert_eq!(s, StatusCode::MULTI_STATUS, "{v}");
    let missed: Vec<&Value> = v["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ok"] == false)
        .collect();
    assert_eq!(missed.len(), 1, "{v}");
    assert_eq!(
        (missed[0]["edge"].as_str(), &missed[0]["queued"]),
        (Some(holder.as_str()), &json!(true)),
        "{v}"
    );
    assert_eq!(c.pending_purges(&holder).await, Some(1.0));
    c.broker.child.kill();
    c.broker.spawn();
    assert_eq!(
        c.pending_purges(&holder).await,
        Some(1.0),
        "the queue survived the restart"
    );

    c.edges[down].spawn();
    wait_secs(30, || async {
        c.pending_purges(&holder).await == Some(0.0)
    })
    .await;
    // Its first answer for the key is a miss: the copy on its disk was purged.
    let mut first = None;
    for _ in 0..200 {
        let r = c.get(path, "eu").await;
        if edge_of(&r) == holder {
            first = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = first.expect("the edge takes traffic again");
    let status = first.status();
    let x_cache = first.headers().get("x-cache").cloned();
    let body = first.text().await.unwrap();
    assert_eq!(
        x_cache.as_ref().map(|v| v.to_str().unwrap()),
        Some("MISS"),
        "{status} {body}"
    );
    let m = c.metrics().await;
    assert_eq!(
        sample(
            &m,
            "shadowcdn_broker_purge_redeliveries_total",
            &["outcome=\"confirmed\""]
        ),
        Some(1.0),
        "{m}"
    );
}

/// An edge draining for shutdown keeps its broker link: a purge sent while a slow request
/// finishes is applied and confirmed, not lost with a link closed at the first signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_draining_for_shutdown_still_confirms_a_purge() {
    use edge_node::sync::protocol::{ErrorCode, Reply, Request, ShadowOrder};
    use edge_node::sync::{client_endpoint, Link, NodeIdentity, TlsPaths};
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.purge("/warm").await;
    let edge = c.edges[0].addr;
    // In flight on eu-a for about 8 s (a 16 KiB chunk a second; no pause near the edge's 5 s
    // origin read timeout), so the drain outlasts the steps below on a loaded machine.
    let slow = tokio::spawn(async move {
        let r = client()
            .get(format!(
                "http://{edge}/slow?size=131072&chunked=1&chunk_delay_ms=1000"
            ))
            .header("host", HOST)
            .send()
            .await?;
        let status = r.status();
        r.bytes().await.map(|_| status)
    });
    wait_until(|| async { origin.hits("/slow") == 1 }).await;
    // The broker's connection is open before the drain (a draining edge takes no new ones).
    let pki = c._dir.path().join("pki");
    let broker = NodeIdentity::load(&TlsPaths {
        ca_cert: pki.join("ca.pem"),
        cert: pki.join("broker.pem"),
        key: pki.join("broker.key"),
        crl: None,
    })
    .unwrap();
    let quic = c.edges[0].sync.unwrap();
    let link = Link::new(
        client_endpoint(&broker, quic).unwrap(),
        quic,
        edge_node::sync::tls::edge_name("eu-a"),
        4,
    );
    link.request(&Request::Stats { ack: None }, Duration::from_secs(3))
        .await
        .unwrap();
    let mut child = std::mem::replace(&mut c.edges[0].child, shadowcdn_tests::Child::placeholder());
    let stopped = tokio::task::spawn_blocking(move || child.terminate());
    // The drain has begun once the proxy port takes no new connection.
    wait_until(|| async { tokio::net::TcpStream::connect(edge).await.is_err() }).await;
    let (s, v) = c
        .purge_with(json!({"host": HOST, "path": "/during-drain"}))
        .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "every edge confirmed, the draining one too: {v}"
    );
    // A refresh ordered now is refused, not accepted and never run: the broker purges a
    // copy it could not refresh, where an accepted order would leave the old one served.
    let refresh = Request::Shadow(ShadowOrder {
        key: format!("{HOST}/warm"),
        ttl_secs: 60,
        priority: 5,
        deadline_ms: 0,
        peer: None,
        refresh: true,
    });
    match link
        .request(&refresh, Duration::from_secs(3))
        .await
        .unwrap()
    {
        Reply::Error { code, message } => {
            assert_eq!(code, ErrorCode::Busy);
            assert!(message.contains("shutting down"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A peer fetch is refused at once: the proxy it reads through takes no connection now,
    // and the asking edge goes to the origin instead.
    let fetch = Request::PeerFetch {
        key: format!("{HOST}/warm"),
        accept_encoding: None,
    };
    match link.request(&fetch, Duration::from_secs(3)).await.unwrap() {
        Reply::Error { code, message } => {
            assert_eq!(code, ErrorCode::Busy);
            assert!(message.contains("shutting down"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(slow.await.unwrap().unwrap(), StatusCode::OK);
    assert_eq!(stopped.await.unwrap(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_still_queued_at_shutdown_leaves_no_stale_copy() {
    queued_refresh_then_stop(false).await;
}

/// An edge that crashes with a refresh accepted but not yet run finds the copy it was to
/// replace on disk at its restart: the refresh's record in its ban log keeps it from being
/// served, however long the edge stays down and whether or not the broker noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_still_queued_at_a_crash_leaves_no_stale_copy() {
    queued_refresh_then_stop(true).await;
}

/// Whether `reply` accepts a shadow order, naming the process that took it.
fn accepted(reply: &edge_node::sync::protocol::Reply) -> bool {
    matches!(
        reply,
        edge_node::sync::protocol::Reply::Done {
            found: true,
            boot_id: Some(_)
        }
    )
}

/// An edge accepts a refresh of a held copy, queued behind a slow fill, and stops before it
/// runs (`crash`: SIGKILL; otherwise SIGTERM); started again, it fetches the copy anew.
async fn queued_refresh_then_stop(crash: bool) {
    use edge_node::sync::protocol::{Request, ShadowOrder};
    use edge_node::sync::{client_endpoint, Link, NodeIdentity, TlsPaths};
    let origin = TestOrigin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let mut edge = EdgeProc::start_with_certs(
        &dir.path().join("e1"),
        "e1",
        &[(HOST.to_string(), origin.addr)],
        "[shadow]\nfill_concurrency = 1\n",
        Some(pki.issue("e1", false)),
    );
    let get = |addr: std::net::SocketAddr| async move {
        client()
            .get(format!("http://{addr}/doc"))
            .header("host", HOST)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(get(edge.addr).await.status(), StatusCode::OK);
    assert_eq!(get(edge.addr).await.headers()["x-cache"], "HIT");
    let broker = pki.issue("broker", true);
    let id = NodeIdentity::load(&TlsPaths {
        ca_cert: broker.ca_cert,
        cert: broker.cert,
        key: broker.key,
        crl: None,
    })
    .unwrap();
    let quic = edge.sync.unwrap();
    let link = Link::new(
        client_endpoint(&id, quic).unwrap(),
        quic,
        edge_node::sync::tls::edge_name("e1"),
        4,
    );
    let order = |path: &str, refresh: bool| {
        Request::Shadow(ShadowOrder {
            key: format!("{HOST}{path}"),
            ttl_secs: 60,
            priority: 5,
            deadline_ms: 0,
            peer: None,
            refresh,
        })
    };
    // A slow fill holds the one fill slot; the origin then changes /doc and the broker
    // orders the copy refreshed: accepted, and queued behind it.
    let slow = order("/slow?delay_ms=3000", false);
    let reply = link.request(&slow, Duration::from_secs(3)).await.unwrap();
    assert!(accepted(&reply), "{reply:?}");
    wait_until(|| async { origin.hits("/slow") == 1 }).await;
    let refresh = order("/doc", true);
    let reply = link
        .request(&refresh, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(accepted(&reply), "{reply:?}");
    // Stopped before the refresh ran, the edge does not keep the old copy.
    let mut child = std::mem::replace(&mut edge.child, shadowcdn_tests::Child::placeholder());
    if crash {
        tokio::task::spawn_blocking(move || child.kill())
            .await
            .unwrap();
    } else {
        let stopped = tokio::task::spawn_blocking(move || child.terminate());
        assert_eq!(stopped.await.unwrap(), Some(0));
    }
    edge.spawn();
    let before = origin.hits("/doc");
    let r = get(edge.addr).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(origin.hits("/doc"), before + 1, "{:?}", r.headers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected_and_change_nothing() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_with("[admin.rate_limits]\npurges_per_minute = 4\n");
    c.register(&origin).await;
    let registered = std::time::Instant::now();
    let url = c.broker.api("/v1/resources");
    let raw = |body: String| {
        let (url, token) = (url.clone(), c.token.clone());
        async move {
            let r = client()
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let s = r.status();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let cases = [
        ("{not json".to_string(), StatusCode::BAD_REQUEST, "bad_json"),
        (
            json!({"host": HOST, "path": "/a", "colour": "red"}).to_string(),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            json!({"host": HOST, "path": "/a", "priority": 11}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            json!({"host": HOST, "path": "no-slash"}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            json!({"host": "bad host", "path": "/a"}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            json!({"host": HOST, "path": "/a", "policy": {"allowed_regions": ["mars"]}})
                .to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
        ),
        (
            format!(
                "{{\"host\":\"{HOST}\",\"path\":\"/{}\"}}",
                "a".repeat(10_000)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (s, v) = raw(body.clone()).await;
        assert_eq!(s, status, "{body:.80}: {v}");
        assert_eq!(v["error"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (s, v) = api(
        reqwest::Method::PUT,
        c.broker.api(&format!("/v1/origins/{HOST}")),
        &c.token,
        Some(json!({"upstream": "ftp://x"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["message"].as_str().unwrap().contains("upstream"));
    // A name that does not resolve would be dropped by every edge: refused now.
    let (s, v) = api(
        reqwest::Method::PUT,
        c.broker.api(&format!("/v1/origins/{HOST}")),
        &c.token,
        Some(json!({"upstream": "http://no-such-origin.invalid"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["message"].as_str().unwrap().contains("resolve"), "{v}");
    let (_, v) = api(
        reqwest::Method::GET,
        c.broker.api("/v1/resources"),
        &c.token,
        None,
    )
    .await;
    assert_eq!(v["resources"], json!([]), "nothing was created");
    let (_, v) = api(
        reqwest::Method::GET,
        c.broker.api("/v1/origins"),
        &c.token,
        None,
    )
    .await;
    assert_eq!(
        v["origins"][0]["upstream"],
        format!("http://{}", origin.addr),
        "origin unchanged"
    );
    let (s, v) = api(
        reqwest::Method::GET,
        c.broker.api("/v1/resources"),
        "scdn_wrong",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    // A provider's purges beyond its budget (4 a minute here, one spent registering the
    // host) are refused with a time to retry; its other calls are not.
    let purge = c.broker.api("/v1/purge");
    let body = json!({"host": HOST, "prefix": "/tmp/"});
    let mut spent = 0;
    let r = loop {
        let r = client()
            .post(&purge)
            .bearer_auth(&c.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::OK || spent == 5 {
            break r;
        }
        spent += 1;
    };
    // Three left; a slow machine may have earned some back since the registration's purge
    // (one every 15 s; that purge came a little before `registered`).
    let earned = ((registered.elapsed().as_secs() + 2) / 15) as usize;
    assert!(
        (3..=3 + earned).contains(&spent),
        "{spent} purges before the first refusal"
    );
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=15).contains(&retry),
        "one purge comes back every 15 s: {retry}"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "rate_limited", "{v}");
    // An event that purges spends the purge budget too; one that only shadows does not.
    let event = |kind: &str| json!({"kind": kind, "host": HOST, "prefix": "/tmp/"});
    let (s, v) = c.event(event("deleted")).await;
    assert_eq!(
        (s, &v["error"]),
        (StatusCode::TOO_MANY_REQUESTS, &json!("rate_limited")),
        "{v}"
    );
    let (s, v) = c
        .event(json!({"kind": "created", "host": HOST, "path": "/new.js"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api(
        reqwest::Method::POST,
        c.broker.api("/v1/resources"),
        &c.token,
        Some(json!({"host": HOST, "path": "/a"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_counts_match_what_was_sent_and_survive_restart() {
    let origin = TestOrigin::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let mut c = start_cluster_with(&format!("access_log = \"{}\"\n", log.display()));
    c.register(&origin).await;
    // Not demand: a write, an error, a redirect. Sent first, so a count of them would show
    // in the totals awaited below.
    let r = client()
        .post(format!("http://{}/m.js", c.broker.addr))
        .header("host", HOST)
        .header("x-client-region", "eu")
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(r.status().as_u16() < 600);
    for query in ["status=503", "status=404", "status=302"] {
        let r = c.get(&format!("/m.js?{query}"), "eu").await;
        assert!(!r.status().is_success(), "{query}: {}", r.status());
    }
    for (region, n) in [("eu", 7), ("us", 4)] {
        for i in 0..n {
            // The query string is not part of the resource.
            let r = c.get(&format!("/m.js?v={i}"), region).await;
            assert_eq!(r.status(), StatusCode::OK);
        }
    }
    let url = c.broker.api(&format!("/v1/series?resource={HOST}/m.js"));
    let token = c.token.clone();
    let counts = || async {
        let (_, v) = api(reqwest::Method::GET, url.clone(), &token, None).await;
        let total = |region: &str| {
            v["regions"][region]["buckets"].as_array().map_or(0, |b| {
                b.iter()
                    .map(|x| x["requests"].as_u64().unwrap())
                    .sum::<u64>()
            })
        };
        (total("eu"), total("us"))
    };
    wait_until(|| async { counts().await == (7, 4) }).await;
    // A refused request is logged too, with the client's region.
    let r = client()
        .get(format!("http://{}/nobody?\"quoted\"", c.broker.addr))
        .header("host", "nobody.test")
        .header("x-client-region", "us")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    c.broker.child.terminate();
    // Every request has its access line once the broker has stopped.
    let all: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refused = all.iter().find(|l| l["host"] == "nobody.test").unwrap();
    assert_eq!(
        (
            &refused["status"],
            &refused["region"],
            &refused["edge"],
            &refused["route"]
        ),
        (&json!(404), &json!("us"), &json!("none"), &json!("none")),
        "{refused}"
    );
    let target = |l: &Value| l["target"].as_str().unwrap().to_string();
    let not_demand: Vec<String> = all
        .iter()
        .map(target)
        .filter(|t| t == "/m.js" || t.starts_with("/m.js?status="))
        .collect();
    assert_eq!(not_demand.len(), 4, "logged, though not demand: {all:?}");
    let lines: Vec<&Value> = all
        .iter()
        .filter(|l| target(l).starts_with("/m.js?v="))
        .collect();
    assert_eq!(lines.len(), 11, "{lines:?}");
    for region in ["eu", "us"] {
        let mine = lines.iter().filter(|l| l["region"] == region).count();
        assert_eq!(mine, if region == "eu" { 7 } else { 4 }, "{lines:?}");
    }
    for l in &lines {
        assert_eq!(
            (&l["status"], &l["method"], &l["host"]),
            (&json!(200), &json!("GET"), &json!(HOST)),
            "{l}"
        );
        assert_eq!(l["route"], "primary", "{l}");
        assert!(l["edge"].as_str().unwrap().contains('-'), "an edge id: {l}");
        assert!(
            ["miss", "hit"].contains(&l["cache"].as_str().unwrap()),
            "{l}"
        );
    }
    c.broker.spawn();
    assert_eq!(counts().await, (7, 4), "history survives a restart");
    let m = c.metrics().await;
    assert!(m.contains("shadowcdn_broker_recorder_drops_total 0"), "{m}");
}

#[test]
fn broker_cli_reports_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.toml");
    std::fs::write(&p, "listen = \"127.0.0.1:1\"\nbogus = 1\n").unwrap();
    let bin = shadowcdn_tests::Binary::get("broker");
    let out = bin
        .command()
        .args(["run", "--config", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    // The file named by the flag's variable is read, and the variable is not taken for a key.
    let partial = dir.path().join("partial.toml");
    std::fs::write(&partial, "listen = \"127.0.0.1:1\"\n").unwrap();
    let out = bin
        .command()
        .arg("run")
        .env("SHADOWCDN_BROKER_CONFIG", &partial)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing field `admin`"), "{err}");
    // The shipped local config, run from a directory without its certificates: its values
    // pass `--check`; `--preflight` opens the QUIC identity too, and names what is missing.
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/local/broker.toml")
        .canonicalize()
        .unwrap();
    let from_here = |flag: &str| {
        bin.command()
            .current_dir(dir.path())
            .args(["run", "--config", local.to_str().unwrap(), flag])
            .output()
            .unwrap()
    };
    let out = from_here("--check");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = from_here("--preflight");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("control") && err.contains("var/local/pki"),
        "{err}"
    );
    assert!(
        dir.path().join("var/local/broker").is_dir(),
        "data_dir made"
    );
}

/// A SIGTERM that comes while the broker is still starting (restoring its state) used to kill
/// it: pingora catches signals only once its listeners are up. It now stops gracefully as soon
/// as it is up (its final snapshot and store close run), and starts again.
#[test]
fn a_sigterm_during_start_up_stops_the_broker_once_it_is_up() {
    let mut c = start_cluster();
    assert_eq!(c.broker.child.terminate(), Some(0));
    shadowcdn_tests::stopped_while_starting(|| {
        c.broker
            .spawn_starting(&[("RUST_LOG", "warn,edge_node::stop_signals=info")]);
        std::mem::replace(&mut c.broker.child, shadowcdn_tests::Child::placeholder())
    });
    c.broker.spawn();
    assert_eq!(c.broker.child.terminate(), Some(0));
}

/// `--preflight` reads the state a start would refuse, without writing it: a revocation list
/// older than the one the broker enforced before, a damaged file of the edges' certificates,
/// a damaged queue of pending purges.
#[test]
fn broker_preflight_reads_the_state_a_start_would_refuse() {
    let mut c = start_cluster();
    assert_eq!(c.broker.child.terminate(), Some(0));
    let config = c.broker.config().to_path_buf();
    let data = config.parent().unwrap().join("data");
    let preflight = || {
        shadowcdn_tests::Binary::get("broker")
            .command()
            .args(["run", "--config", config.to_str().unwrap(), "--preflight"])
            .output()
            .unwrap()
    };
    let out = preflight();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let numbers = data.join("quic-crl-number.json");
    let kept = std::fs::read(&numbers).expect("the broker kept its list's number");
    let mut raised: Value = serde_json::from_slice(&kept).unwrap();
    raised["crl_number"] = u64::MAX.into();
    let damaged = [
        (numbers, raised.to_string(), "older than"),
        (
            data.join("quic-edge-certificates.json"),
            "{\"edges\": {\"us-a\": \"not hex\"}}".to_string(),
            "quic-edge-certificates.json",
        ),
        (
            data.join("pending-purges.json"),
            "{".to_string(),
            "pending-purges.json",
        ),
    ];
    for (path, body, says) in damaged {
        let before = std::fs::read(&path).ok();
        std::fs::write(&path, &body).unwrap();
        let out = preflight();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{}: {err}", path.display());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), body, "not written");
        match before {
            Some(b) => std::fs::write(&path, b).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
    }
    let out = preflight();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    c.broker.spawn();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_demand_is_shadowed_before_the_next_request_in_the_region() {
    let origin = TestOrigin::start().await;
    // No precision floor: the forecast soon falls below the default 0.6, and the edge's
    // restart below is to be followed by a placement as long as the forecast allows.
    let mut c = start_cluster_with(&format!(
        "{}[cost]\nmin_precision = 0.0\n",
        lstm_planner("threshold = 0.2\n")
    ));
    c.register(&origin).await;
    c.add_resource(json!({"host": HOST, "path": "/hot/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 86400})).await;

    // Steady demand from the us region, then the object is purged everywhere.
    for _ in 0..12 {
        assert_eq!(c.get("/hot/app.js", "us").await.status(), StatusCode::OK);
    }
    c.purge("/hot/app.js").await;
    let fetched_before = origin.hits("/hot/app.js");

    // The planner forecasts us demand and shadows the object on the us edge.
    let key = format!("{HOST}/hot/app.js");
    wait_until(|| async {
        let v = c.explain(&key).await;
        v["decisions"].as_array().is_some_and(|d| {
            d.iter().any(|d| {
                d["region"] == "us" && (d["outcome"] == "shadowed" || d["outcome"] == "kept")
            })
        })
    })
    .await;
    let v = c.explain(&key).await;
    let d = decision_in(&v, "us").expect("a decision for us");
    assert_eq!(d["edge"], "us-a", "{v}");
    assert!(
        d["p_any"].as_f64().unwrap() >= d["threshold"].as_f64().unwrap(),
        "{v}"
    );
    // A small object: a used shadow earns more than a wasted one loses, and the forecast
    // clears its break-even odds too.
    assert!(
        d["stake"]["used"].as_f64().unwrap() > 0.0 && d["stake"]["wasted"].as_f64().unwrap() < 0.0,
        "{v}"
    );
    assert!(
        d["p_any"].as_f64().unwrap() >= d["break_even"].as_f64().unwrap(),
        "{v}"
    );
    // The forecaster's own P beside the calibrated one.
    assert!(
        d["p_any_forecast"]
            .as_f64()
            .is_some_and(|p| (0.0..=1.0).contains(&p)),
        "{v}"
    );
    assert_eq!(v["resource"]["priority"], 9);
    wait_until(|| c.shadowed_on(3, &key)).await;
    assert_eq!(
        origin.hits("/hot/app.js"),
        fetched_before + 1,
        "one shadow fill"
    );

    // The next request from us is a hit on the shadow, without going to the origin.
    let r = c.get("/hot/app.js", "us").await;
    assert_eq!(edge_of(&r), "us-a");
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");
    assert_eq!(origin.hits("/hot/app.js"), fetched_before + 1);
    let m = c.metrics().await;
    assert!(
        m.contains("shadowcdn_broker_shadows_issued_total{outcome=\"ok\"}"),
        "{m}"
    );
    assert!(
        m.contains("shadowcdn_broker_forecaster_fallback 0"),
        "the LSTM is serving:\n{m}"
    );
    // The per-series guard counted who answered the series it planned.
    let answered: f64 = ["model", "seasonal_naive", "ewma"]
        .iter()
        .filter_map(|a| {
            sample(
                &m,
                "shadowcdn_broker_forecaster_series",
                &[&format!("answer=\"{a}\"")],
            )
        })
        .sum();
    assert!(answered >= 1.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "shadowcdn_broker_forecaster_events_total",
            &["event=\"load\""]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        sample(&m, "shadowcdn_broker_planner_tick_seconds_count", &[]).is_some_and(|n| n > 0.0),
        "{m}"
    );

    // A restarted broker adopts the shadow the edge still holds instead of ordering it again.
    c.broker.child.kill();
    c.broker.spawn();
    wait_until(|| async { decision_in(&c.explain(&key).await, "us").is_some() }).await;
    let v = c.explain(&key).await;
    let d = decision_in(&v, "us").expect("a decision for us");
    // Kept, or expiring once the demand cooled (the clock runs 300 times fast): either way
    // adopted, not ordered again.
    assert!(d["outcome"] == "kept" || d["outcome"] == "expiring", "{v}");

    // A restarted edge lost its marks (they live in its memory): the broker notices the new
    // process and decides the key afresh instead of counting it as kept, placing it again
    // while the forecast still clears the bar. The clock runs 300 times fast, so on a loaded
    // machine the demand may have gone cold (a bucket is 3 s) before the broker next
    // decides; then the decision must say why nothing was placed.
    assert_eq!(c.edges[3].child.terminate(), Some(0));
    c.edges[3].spawn();
    let decided_again = poll_secs(30, || async {
        c.shadowed_on(3, &key).await
            || decision_in(&c.explain(&key).await, "us")
                .is_some_and(|d| !matches!(d["outcome"].as_str(), Some("kept" | "shadowed")))
    })
    .await;
    let v = c.explain(&key).await;
    assert!(decided_again, "still counted as kept: {v}");
    let d = decision_in(&v, "us").expect("a decision for us");
    match d["outcome"].as_str().unwrap_or_default() {
        // Placed again (its fill may still be running).
        "shadowed" | "kept" => wait_secs(30, || c.shadowed_on(3, &key)).await,
        held if held.starts_with("below_") => {
            let bar = ["threshold", "break_even", "precision_floor"]
                .iter()
                .map(|k| d[k].as_f64().unwrap())
                .fold(0.0, f64::max);
            assert!(d["p_any"].as_f64().unwrap() < bar, "{v}");
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forecast_shadow_that_cannot_pay_for_its_fill_is_not_placed() {
    let origin = TestOrigin::start().await;
    // Latency is worth nothing here: a used shadow filled from the origin only moves its
    // fetch earlier and still costs the fill, so no forecast is sure enough to pay for it.
    // Without the precision floor (0.6 by default, above which this forecast of twelve
    // requests may not rise) the 0.2 threshold is the only other bar.
    let cfg = format!(
        "{}[cost]\nlatency_value_per_sec = 0.0\nmin_precision = 0.0\n",
        lstm_planner("threshold = 0.2\n")
    );
    let mut c = start_cluster_with(&cfg);
    c.register(&origin).await;
    c.add_resource(json!({"host": HOST, "path": "/hot/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 86400})).await;
    for _ in 0..12 {
        assert_eq!(c.get("/hot/app.js", "us").await.status(), StatusCode::OK);
    }
    let key = format!("{HOST}/hot/app.js");
    wait_until(|| async {
        decision_in(&c.explain(&key).await, "us")
            .is_some_and(|d| d["outcome"] == "below_break_even")
    })
    .await;
    let v = c.explain(&key).await;
    let d = decision_in(&v, "us").unwrap();
    assert!(
        d["p_any"].as_f64().unwrap() >= d["threshold"].as_f64().unwrap(),
        "the threshold alone would have shadowed it: {v}"
    );
    assert!(d["stake"]["used"].as_f64().unwrap() < 0.0, "{v}");
    // No odds break even: JSON has no infinity.
    assert!(d["break_even"].is_null(), "{v}");
    assert!(d["peer"].is_null(), "only the target edge holds it: {v}");
    let m = c.metrics().await;
    assert!(
        m.contains("shadowcdn_broker_planner_decisions_total{outcome=\"below_break_even\"}"),
        "{m}"
    );
    assert!(c.not_shadowed_on(3, &key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modification_events_shadow_refresh_and_delete_copies_everywhere() {
    let mut origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.add_resource(json!({"host": HOST, "path": "/launch/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 600,
                    "policy": {"max_copies": 2, "allowed_regions": ["eu", "us"]}})).await;
    let key = format!("{HOST}/launch/new.js");

    // created + high priority → shadowed at once in both regions, before any request.
    let (s, v) = c
        .event(json!({"kind": "created", "host": HOST, "path": "/launch/new.js"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let shadowed: Vec<String> = v["shadowed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["edge"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(shadowed.len(), 2, "{v}");
    assert!(shadowed.contains(&"us-a".to_string()), "{v}");
    let eu_edge = c
        .edges
        .iter()
        .position(|e| {
            shadowed
                .iter()
                .any(|s| s.starts_with("eu") && e.dir.ends_with(s))
        })
        .unwrap();
    wait_until(|| async { c.shadowed_on(eu_edge, &key).await && c.shadowed_on(3, &key).await })
        .await;
    assert_eq!(origin.hits("/launch/new.js"), 2, "one fill per region");
    for region in ["eu", "us"] {
        let r = c.get("/launch/new.js", region).await;
        assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit", "{region}");
    }
    assert_eq!(origin.hits("/launch/new.js"), 2);

    // updated → every copy invalidated and the live shadows refetched.
    let (s, v) = c
        .event(json!({"kind": "updated", "host": HOST, "path": "/launch/new.js"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["refilled"].as_array().unwrap().len(), 2, "{v}");
    wait_until(|| async { origin.hits("/launch/new.js") == 4 }).await;
    wait_until(|| async { c.shadowed_on(eu_edge, &key).await && c.shadowed_on(3, &key).await })
        .await;

    // deleted → gone everywhere: the next request goes to the origin.
    let (s, v) = c
        .event(json!({"kind": "deleted", "host": HOST, "path": "/launch/new.js"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(c.not_shadowed_on(3, &key).await && c.not_shadowed_on(eu_edge, &key).await);
    let r = c.get("/launch/new.js", "us").await;
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert!(c
        .metrics()
        .await
        .contains("shadowcdn_broker_event_propagation_seconds_count{kind=\"deleted\"} 1"));
    // A created event cannot take a prefix.
    let (s, _) = c
        .event(json!({"kind": "created", "host": HOST, "prefix": "/launch/"}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // updated while the origin is down: the refresh cannot reach it, and the edges drop
    // the replaced version rather than keep serving it as fresh.
    let old = format!("{HOST}/launch/old.js");
    let (s, v) = c
        .event(json!({"kind": "created", "host": HOST, "path": "/launch/old.js"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    wait_until(|| async { c.shadowed_on(3, &old).await }).await;
    origin.stop().await;
    let (s, v) = c
        .event(json!({"kind": "updated", "host": HOST, "path": "/launch/old.js"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    wait_until(|| async { c.not_shadowed_on(3, &old).await }).await;
    let r = c.get("/launch/old.js", "us").await;
    assert_ne!(
        r.headers().get("x-cache").map(|v| v.to_str().unwrap()),
        Some("HIT")
    );
}

/// An `updated` event refreshes a live shadow in place, fetching the variant the edge's
/// clients ask for most; for an object that varies (here on `Accept-Encoding`) every other
/// variant the edge stored must stop serving the old version too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_reaches_every_variant_of_a_shadowed_object() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.add_resource(json!({"host": HOST, "path": "/v/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 600,
                    "policy": {"max_copies": 1, "allowed_regions": ["us"]}})).await;
    let path = "/v/app.js?gen=1&vary=accept-encoding";
    let key = format!("{HOST}{path}");
    let get = |coding: Option<&'static str>| {
        let mut r = client()
            .get(format!("http://{}{path}", c.broker.addr))
            .header("host", HOST)
            .header("x-client-region", "us");
        if let Some(coding) = coding {
            r = r.header("accept-encoding", coding);
        }
        async move { r.send().await.unwrap() }
    };
    // Three variants on us-a: identity first (the object's primary slot), then gzip, then br,
    // which its clients ask for most.
    for coding in [None, Some("gzip"), Some("br"), Some("br"), Some("br")] {
        assert_eq!(get(coding).await.status(), StatusCode::OK);
    }
    assert_eq!(origin.hits("/v/app.js"), 3);
    let (s, v) = c
        .event(json!({"kind": "created", "host": HOST, "path": path}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    wait_until(|| c.shadowed_on(3, &key)).await;
    assert_eq!(origin.hits("/v/app.js"), 3, "the edge held it already");

    origin.bump();
    let (s, v) = c
        .event(json!({"kind": "updated", "host": HOST, "path": path}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["refilled"].as_array().unwrap().len(), 1, "{v}");
    wait_until(|| async { origin.hits("/v/app.js") == 4 }).await;
    wait_until(|| c.shadowed_on(3, &key)).await;
    // The refill fetched br, which clients then find in cache.
    let r = get(Some("br")).await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.text().await.unwrap(), "variant=br;gen=1");
    for (coding, body) in [
        (Some("gzip"), "variant=gzip;gen=1"),
        (None, "variant=identity;gen=1"),
    ] {
        let r = get(coding).await;
        assert_eq!(r.headers()["x-cache"], "MISS", "{coding:?}");
        assert_eq!(r.text().await.unwrap(), body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_is_filled_from_the_nearest_peer_edge_instead_of_the_origin() {
    let origin = TestOrigin::start().await;
    // Peer-fill mechanics, not precision: the floor per placement would hold back this
    // series' modest forecast.
    let cfg = format!(
        "{}[cost]\nmin_precision = 0.0\n",
        lstm_planner("threshold = 0.2\n")
    );
    // The broker knows the edges by name (`localhost`, from the hosts file: no DNS server is
    // asked), as in a Kubernetes deployment: routing, health, the QUIC control links and
    // the peer addresses given to the edges all go through its resolution.
    let mut c = start_cluster_listing(&cfg, &|a| format!("localhost:{}", a.port()));
    let names = ["eu-a", "eu-b", "eu-s", "us-a"];
    wait_until(|| async {
        let m = c.metrics().await;
        names.iter().all(|e| {
            let edge = format!("edge=\"{e}\"");
            sample(&m, "shadowcdn_broker_edge_up", &[edge.as_str()]) == Some(1.0)
        })
    })
    .await;
    c.register(&origin).await;
    c.add_resource(json!({"host": HOST, "path": "/peer/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 86400})).await;

    // us-a is down: us clients fail over to the eu owner, which caches the object; the
    // broker records their demand under us.
    assert_eq!(c.edges[3].child.terminate(), Some(0));
    for region in ["us", "eu", "us", "eu", "us", "us", "eu", "us"] {
        let r = c.get("/peer/lib.js", region).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(edge_of(&r).starts_with("eu-"), "{}", edge_of(&r));
    }
    assert_eq!(origin.hits("/peer/lib.js"), 1);

    // us-a comes back (knowing the host from its config file); the planner shadows the
    // object there and names the eu owner as its source.
    c.edges[3].origins = vec![(HOST.to_string(), origin.addr)];
    c.edges[3].spawn();
    let key = format!("{HOST}/peer/lib.js");
    // The decision that places the shadow names its peer (a forecast, or a surge in eu
    // widening into us); later ticks say "kept" and name the peer they would use now. Keep
    // the placing decision when a poll sees it, else the latest about us-a.
    let placed = std::sync::Mutex::new(None::<Value>);
    let reached = poll_secs(30, || async {
        let v = c.explain(&key).await;
        for d in v["decisions"].as_array().into_iter().flatten() {
            let placing = d["outcome"] == "shadowed" || d["outcome"] == "widened";
            if d["edge"] != "us-a" || !(placing || d["outcome"] == "kept") {
                continue;
            }
            let mut p = placed.lock().unwrap();
            if placing || p.as_ref().is_none_or(|old| old["outcome"] == "kept") {
                *p = Some(d.clone());
            }
        }
        let caught = placed.lock().unwrap().is_some();
        caught && c.shadowed_on(3, &key).await
    })
    .await;
    let explain_now = c.explain(&key).await;
    assert!(
        reached,
        "no shadow on us-a in 30 s; placed: {:?}\nexplain: {}\n--- broker\n{}\n--- us-a\n{}",
        placed.lock().unwrap(),
        explain_now,
        c.broker.child.log(),
        c.edges[3].child.log()
    );
    // The fill's source is counted just after its mark is set.
    let us_admin = c.edges[3].admin;
    let peer_fills = |m: &str| {
        sample(
            m,
            "shadowcdn_edge_shadow_fill_sources_total",
            &["source=\"peer\""],
        )
    };
    poll_secs(5, || async {
        peer_fills(&text(format!("http://{us_admin}/metrics")).await) == Some(1.0)
    })
    .await;
    let us_metrics = text(format!("http://{us_admin}/metrics")).await;
    assert_eq!(peer_fills(&us_metrics), Some(1.0), "{us_metrics}");
    assert_eq!(origin.hits("/peer/lib.js"), 1, "the origin was spared");
    for outcome in ["ok", "error"] {
        assert_eq!(
            sample(
                &us_metrics,
                "shadowcdn_edge_origin_fetches_total",
                &[&format!("outcome=\"{outcome}\"")]
            )
            .unwrap_or(0.0),
            0.0,
            "a peer fill is no origin fetch: {us_metrics}"
        );
    }
    let us = placed.lock().unwrap().clone().unwrap();
    let v = &us;
    assert!(us["peer"].as_str().unwrap().starts_with("eu-"), "{v}");
    assert!(us["budget_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(us["expected_in_secs"].as_f64().unwrap() <= 3600.0, "{v}");

    // An eu edge served it over QUIC, from its cache.
    let mut served = 0.0;
    let in_eu = |e: &&EdgeProc| e.dir.to_string_lossy().contains("/eu-");
    for e in c.edges.iter().filter(in_eu) {
        let m = text(format!("http://{}/metrics", e.admin)).await;
        served += sample(
            &m,
            "shadowcdn_edge_quic_messages_total",
            &["type=\"peer_fetch\"", "outcome=\"ok\""],
        )
        .unwrap_or(0.0);
    }
    assert!(served >= 1.0, "no eu edge served a peer fetch");

    // The next us request is a shadow hit on us-a, and the body is intact.
    let r = c.get("/peer/lib.js", "us").await;
    assert_eq!(edge_of(&r), "us-a");
    assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");
    let body = r.bytes().await.unwrap();
    assert_eq!(
        &body[..],
        &shadowcdn_tests::origin::body_for("/peer/lib.js", 64)[..]
    );
    assert_eq!(origin.hits("/peer/lib.js"), 1);
    let m = c.metrics().await;
    assert_eq!(
        sample(&m, "shadowcdn_broker_quic_connected", &["edge=\"us-a\""]),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_without_a_valid_certificate_cannot_join() {
    use edge_node::sync::protocol::{ErrorCode, Reply, Request};
    use edge_node::sync::tls::edge_name;
    use edge_node::sync::{client_endpoint, Link, NodeIdentity, TlsPaths};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(&dir.path().join("pki"));
    let rogue_pki = Pki::create(&dir.path().join("rogue-pki"));
    let good_certs = pki.issue("good", false);
    let mut good = EdgeProc::start_with_certs(
        &dir.path().join("good"),
        "good",
        &[],
        "",
        Some(good_certs.clone()),
    );
    let rogue = EdgeProc::start_with_certs(
        &dir.path().join("rogue"),
        "rogue",
        &[],
        "",
        Some(rogue_pki.issue("rogue", false)),
    );
    let specs = [
        EdgeSpec {
            id: "good",
            region: "eu",
            role: "active",
            edge: &good,
        },
        EdgeSpec {
            id: "rogue",
            region: "us",
            role: "active",
            edge: &rogue,
        },
    ];
    let mut broker =
        BrokerProc::start_with_certs(dir.path(), &specs, "", Some(&pki.issue("broker", true)));

    // The broker's control channel reaches the edge with a cluster certificate only.
    let metrics_url = broker.metrics_url();
    wait_until(|| async {
        sample(
            &text(metrics_url.clone()).await,
            "shadowcdn_broker_edge_stats",
            &["edge=\"good\"", "stat=\"cache_capacity_bytes\""],
        )
        .is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = text(metrics_url).await;
    assert_eq!(
        sample(&m, "shadowcdn_broker_quic_connected", &["edge=\"good\""]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "shadowcdn_broker_quic_connected", &["edge=\"rogue\""]),
        Some(0.0),
        "{m}"
    );
    assert!(
        sample(&m, "shadowcdn_broker_edge_stats", &["edge=\"rogue\""]).is_none(),
        "{m}"
    );
    // The edge keeps the broker's address as the fleet's, across its restarts too.
    let known = good
        .dir
        .join("cache")
        .join(edge_node::sync::KNOWN_ADDRESSES_FILE);
    wait_secs(30, || async {
        std::fs::read_to_string(&known).is_ok_and(|t| t.contains("\"127.0.0.1\""))
    })
    .await;

    let good_quic = good.sync.unwrap();
    let link_as = |ca: &std::path::Path, name: &str, certs_dir: &std::path::Path| {
        let id = NodeIdentity::load(&TlsPaths {
            ca_cert: ca.to_path_buf(),
            cert: certs_dir.join(format!("{name}.pem")),
            key: certs_dir.join(format!("{name}.key")),
            crl: None,
        })
        .unwrap();
        Link::new(
            client_endpoint(&id, good_quic).unwrap(),
            good_quic,
            edge_name("good"),
            4,
        )
    };
    let ca = dir.path().join("pki/ca.pem");
    let timeout = Duration::from_secs(3);

    // A node whose certificate the cluster CA did not issue is refused at the handshake,
    // even when it trusts the cluster CA itself.
    let rogue_link = link_as(&ca, "rogue", &dir.path().join("rogue-pki"));
    assert!(rogue_link
        .request(&Request::Stats { ack: None }, timeout)
        .await
        .is_err());
    let good_admin = good.admin;
    wait_until(|| async {
        sample(
            &text(format!("http://{good_admin}/metrics")).await,
            "shadowcdn_edge_quic_handshake_failures_total",
            &[],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;

    // A cluster edge may connect (peer fills) but not give orders.
    let eu2 = pki.issue("eu-2", false);
    let peer_link = link_as(&ca, "eu-2", &dir.path().join("pki"));
    match peer_link
        .request(&Request::Stats { ack: None }, timeout)
        .await
        .unwrap()
    {
        Reply::Error { code, .. } => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    let fetch = Request::PeerFetch {
        key: "nowhere.test/x".into(),
        accept_encoding: None,
    };
    match peer_link.request(&fetch, timeout).await.unwrap() {
        Reply::Error { code, .. } => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }

    // The broker's certificate may.
    let broker_link = link_as(&ca, "broker", &dir.path().join("pki"));
    match broker_link
        .request(&Request::Stats { ack: None }, timeout)
        .await
        .unwrap()
    {
        Reply::Stats(s) => assert_eq!(s.node_id, "good"),
        other => panic!("{other:?}"),
    }

    // One peer holds at most 8 connections (a broker or a peer uses one).
    pki.issue("eu-3", false);
    let mut links = Vec::new();
    for _ in 0..8 {
        let l = link_as(&ca, "eu-3", &dir.path().join("pki"));
        assert!(l
            .request(&Request::Stats { ack: None }, timeout)
            .await
            .is_ok());
        links.push(l);
    }
    let ninth = link_as(&ca, "eu-3", &dir.path().join("pki"));
    assert!(ninth
        .request(&Request::Stats { ack: None }, timeout)
        .await
        .is_err());
    // Refused, the ninth backs off rather than redialling at every request.
    let again = ninth
        .request(&Request::Stats { ack: None }, timeout)
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("backing off"), "{again}");
    drop(links);

    // A revoked node is cut off once the edge reads the list (every 30 s): its open
    // connection then, and its handshakes from then on; the others go on. An edge revoked
    // (good itself) is also taken out of client routing once the broker reads the list, and
    // out of the peer list the broker pushes to the other edges.
    let peers_of_rogue = || async {
        client()
            .get(format!("http://{}/peers", rogue.admin))
            .bearer_auth(shadowcdn_tests::cluster::EDGE_TOKEN)
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let lists_good = |v: &serde_json::Value| {
        v["peers"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["id"] == "good"))
    };
    wait_until(|| async { lists_good(&peers_of_rogue().await) }).await;
    pki.revoke(&[&eu2, &good_certs]);
    wait_secs(45, || async {
        peer_link
            .request(&Request::Stats { ack: None }, timeout)
            .await
            .is_err()
    })
    .await;
    let again = peer_link
        .request(&Request::Stats { ack: None }, timeout)
        .await
        .unwrap_err();
    assert!(!peer_link.is_connected(), "{again}");
    // The edge exports what its list names and when its own certificate ends (a year).
    let m = text(format!("http://{good_admin}/metrics")).await;
    assert_eq!(
        sample(&m, "shadowcdn_edge_quic_revoked_certificates", &[]),
        Some(2.0),
        "{m}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert_eq!(
        sample(&m, "shadowcdn_edge_quic_revocation_list_refused", &[]),
        Some(0.0),
        "{m}"
    );
    let end = sample(&m, "shadowcdn_edge_quic_cert_expiry_timestamp_seconds", &[]).unwrap();
    assert!(
        (end - now - 365.0 * 86_400.0).abs() < 86_400.0,
        "{end} vs {now}"
    );
    let bm = text(broker.metrics_url()).await;
    assert!(
        sample(
            &bm,
            "shadowcdn_broker_quic_cert_expiry_timestamp_seconds",
            &[]
        )
        .is_some_and(|t| t > now),
        "{bm}"
    );
    let broker_metrics = broker.metrics_url();
    wait_secs(45, || async {
        sample(
            &text(broker_metrics.clone()).await,
            "shadowcdn_broker_edge_up",
            &["edge=\"good\""],
        ) == Some(0.0)
    })
    .await;
    match broker_link
        .request(&Request::Stats { ack: None }, timeout)
        .await
        .unwrap()
    {
        Reply::Stats(s) => assert_eq!(s.node_id, "good"),
        other => panic!("{other:?}"),
    }
    wait_until(|| async { !lists_good(&peers_of_rogue().await) }).await;

    // The broker judges an edge by the certificate it last presented, kept in its data
    // directory: restarted while the revoked edge shows no certificate at all (it serves HTTP,
    // its QUIC port is silent), the broker still routes no client there. The rogue edge (a
    // foreign certificate, not a revoked one) only lacks its QUIC link, as before.
    broker.child.terminate();
    good.child.terminate();
    good.sync = None;
    good.spawn();
    broker.spawn();
    let edge_up =
        |m: &str, id: &str| sample(m, "shadowcdn_broker_edge_up", &[&format!("edge=\"{id}\"")]);
    let broker_metrics = broker.metrics_url();
    wait_until(|| async { edge_up(&text(broker_metrics.clone()).await, "rogue") == Some(1.0) })
        .await;
    // Past several stats polls (1 s) and their failed redials (2 s each).
    for _ in 0..7 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = text(broker.metrics_url()).await;
        assert_eq!(edge_up(&m, "good"), Some(0.0), "{m}");
        assert_eq!(edge_up(&m, "rogue"), Some(1.0), "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_outcomes_are_priced_per_region_and_ungated_ones_move_no_threshold() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_with("[planner]\ninterval_secs = 1\n");
    c.register(&origin).await;
    let v = c.add_resource(json!({"host": HOST, "path": "/cost/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 5,
                    "policy": {"max_copies": 2, "allowed_regions": ["eu", "us"]}})).await;
    let provider = v["provider"].as_str().unwrap().to_string();

    // Two launches shadowed in both regions; only eu asks for them, well within the TTL (a
    // shorter one could run out on a loaded machine before the requests come).
    for path in ["/cost/used.js", "/cost/also-used.js"] {
        let (s, v) = c
            .event(json!({"kind": "created", "host": HOST, "path": path}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    wait_until(|| async {
        origin.hits("/cost/used.js") == 2 && origin.hits("/cost/also-used.js") == 2
    })
    .await;
    for path in ["/cost/used.js", "/cost/also-used.js"] {
        let r = c.get(path, "eu").await;
        assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");
    }

    // After the TTL the edges report how each shadow ended; the ledger prices them.
    let url = c.broker.api("/v1/cost");
    let token = OPERATOR_TOKEN.to_string();
    let rollup = |v: &Value, region: &str| {
        v["rollups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["region"] == region && r["provider"] == provider.as_str())
            .cloned()
    };
    let settled = |v: &Value| {
        ["eu", "us"]
            .iter()
            .all(|r| rollup(v, r).is_some_and(|x| x["shadows"].as_u64() >= Some(2)))
    };
    wait_secs(20, || async {
        settled(&api(reqwest::Method::GET, url.clone(), &token, None).await.1)
    })
    .await;
    let (_, report) = api(reqwest::Method::GET, url.clone(), &token, None).await;
    let (eu, us) = (
        rollup(&report, "eu").unwrap(),
        rollup(&report, "us").unwrap(),
    );
    assert!(eu["used"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(us["used"], 0, "{report}");
    assert!(us["spend"].as_f64().unwrap() > 0.0, "{report}");
    assert!(us["net"].as_f64().unwrap() < 0.0, "{report}");
    assert!(
        eu["net"].as_f64().unwrap() > us["net"].as_f64().unwrap(),
        "{report}"
    );

    // Events are placed whatever the thresholds, so their outcomes say nothing about the
    // forecasts' threshold: us's waste does not raise it, eu's use does not lower it, also
    // once a tuner would have decided (max_wait_ticks, 5, planning ticks later).
    let ticks = || async {
        sample(
            &c.metrics().await,
            "shadowcdn_broker_planner_tick_seconds_count",
            &[],
        )
        .unwrap_or(0.0)
    };
    let settled_at = ticks().await;
    wait_secs(30, || async { ticks().await >= settled_at + 6.0 }).await;
    let (_, report) = api(reqwest::Method::GET, url.clone(), &token, None).await;
    assert_eq!(report["changes"], json!([]), "{report}");
    let m = c.metrics().await;
    assert!(
        sample(&m, "shadowcdn_broker_shadow_precision", &["region=\"us\""]) == Some(0.0),
        "{m}"
    );
    assert!(
        sample(
            &m,
            "shadowcdn_broker_shadow_spend_dollars_total",
            &["category=\"fill_origin\""]
        )
        .is_some_and(|x| x > 0.0),
        "{m}"
    );
    // The operator view needs the operator token.
    let (s, _) = api(reqwest::Method::GET, url, &c.token, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// A graceful stop of an edge ends its shadow marks and leaves their outcomes to the next
/// process, which reports them: the ledger prices a shadow's fill and its hit although its
/// hour-long TTL has not run out, where before both were lost with the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_edge_reports_the_shadows_its_stop_ended() {
    restarted_edge_settles_its_shadow(false).await;
}

/// An edge killed with SIGKILL reports nothing of its shadows; the next process says they
/// are lost, and the ledger prices the shadow as filled and unused (its hit went with the
/// process) instead of forgetting it unpriced once its TTL ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_edge_has_its_lost_shadows_priced() {
    restarted_edge_settles_its_shadow(true).await;
}

/// Shadow an object on an eu edge, hit it, stop the edge (`crash`: SIGKILL) and start it
/// again; the ledger settles the shadow.
async fn restarted_edge_settles_its_shadow(crash: bool) {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let v = c.add_resource(json!({"host": HOST, "path": "/keep/", "match": "prefix", "priority": 9, "shadow_ttl_secs": 3600,
                    "policy": {"max_copies": 1, "allowed_regions": ["eu"]}})).await;
    let provider = v["provider"].as_str().unwrap().to_string();
    let (s, v) = c
        .event(json!({"kind": "created", "host": HOST, "path": "/keep/a.js"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    wait_until(|| async { origin.hits("/keep/a.js") == 1 }).await;
    let r = c.get("/keep/a.js", "eu").await;
    assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");
    let holder = edge_of(&r);
    let i = c
        .edges
        .iter()
        .position(|e| e.dir.ends_with(&holder))
        .unwrap();

    let url = c.broker.api("/v1/cost");
    let eu = || async {
        let (_, v) = api(reqwest::Method::GET, url.clone(), OPERATOR_TOKEN, None).await;
        v["rollups"].as_array().and_then(|rows| {
            rows.iter()
                .find(|r| r["region"] == "eu" && r["provider"] == provider.as_str())
                .cloned()
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        eu().await.is_none(),
        "nothing settled while the shadow lives"
    );
    let (saved, running) = (
        c.edges[i].dir.join("cache/shadow-outcomes.json"),
        c.edges[i].dir.join("cache/shadow-process.running"),
    );
    assert!(running.exists());
    if crash {
        c.edges[i].child.kill();
        assert!(!saved.exists() && running.exists());
    } else {
        assert_eq!(c.edges[i].child.terminate(), Some(0));
        assert!(saved.exists() && !running.exists());
    }
    c.edges[i].spawn();
    wait_secs(30, || async {
        eu().await.is_some_and(|r| r["shadows"].as_u64() >= Some(1))
    })
    .await;
    let row = eu().await.unwrap();
    assert_eq!(row["shadows"], 1, "{row}");
    assert_eq!(row["used"], if crash { 0 } else { 1 }, "{row}");
    assert_eq!(row["lost"], if crash { 1 } else { 0 }, "{row}");
    assert!(row["spend"].as_f64().unwrap() > 0.0, "{row}");
    assert!(!saved.exists());
    wait_until(|| async { running.exists() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_budget_of_an_edge_is_never_exceeded() {
    let origin = TestOrigin::start().await;
    // 80 MiB of cache × 1.5e-4 ≈ 12.6 KB of shadows per edge: four 64-byte objects, each
    // with the 3 KiB the broker counts for an edge's entry beside its body. The budget is
    // under test, not precision: no floor per placement.
    let cfg = format!(
        "{}[cost]\nmin_precision = 0.0\n",
        lstm_planner("threshold = 0.05\nbudget_share = 0.00015\nmin_safety = 1.0\n")
    );
    let mut c = start_cluster_with(&cfg);
    c.register(&origin).await;
    let paths: Vec<String> = (0..6).map(|i| format!("/budget/{i}.css")).collect();
    for round in 0..3 {
        for (i, p) in paths.iter().enumerate() {
            // Unequal demand, so the ranking is not a tie.
            for _ in 0..=(i + round) % 4 {
                assert_eq!(c.get(p, "us").await.status(), StatusCode::OK);
            }
        }
    }
    // Purge so every copy on us-a would have to be a shadow.
    for p in &paths {
        c.purge(p).await;
    }
    let outcomes = || async {
        let mut out = Vec::new();
        for p in &paths {
            let v = c.explain(&format!("{HOST}{p}")).await;
            for d in v["decisions"].as_array().into_iter().flatten() {
                if d["edge"] == "us-a" {
                    out.push((
                        d["outcome"].as_str().unwrap().to_string(),
                        d["budget_bytes"].as_u64().unwrap(),
                    ));
                }
            }
        }
        out
    };
    wait_secs(20, || async {
        let o = outcomes().await;
        o.iter().any(|(x, _)| x == "budget")
            && o.iter().any(|(x, _)| x == "shadowed" || x == "kept")
    })
    .await;
    let us_admin = c.edges[3].admin;
    let budget = outcomes().await[0].1;
    assert!((11_000..=14_000).contains(&budget), "{budget}");
    // Over several planning ticks, what us-a holds as shadows stays within its budget: as
    // many 64-byte bodies as fit with their entries' overhead.
    let most = budget / (64 + 3072) * 64; // broker::planner::EDGE_ENTRY_OVERHEAD
    for _ in 0..6 {
        let m = text(format!("http://{us_admin}/metrics")).await;
        let held = sample(&m, "shadowcdn_edge_shadow_bytes", &[]).unwrap();
        assert!(held <= most as f64, "{held} > {most}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = text(format!("http://{us_admin}/metrics")).await;
    assert!(
        sample(&m, "shadowcdn_edge_shadow_bytes", &[]).unwrap() > 0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_planner_off_co_access_shadows_are_still_settled_and_tuned() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_with("[planner]\nenabled = false\ninterval_secs = 1\n");
    c.register(&origin).await;
    c.learn_then_purge_the_script().await;
    assert_eq!(
        c.get("/page/index.html", "us").await.status(),
        StatusCode::OK
    );
    let key = format!("{HOST}/page/app.js");
    wait_until(|| c.shadowed_on(3, &key)).await;
    // No forecasts, but the co-access threshold that admitted it is tuned and exported.
    wait_until(|| async {
        sample(
            &c.metrics().await,
            "shadowcdn_broker_shadow_threshold",
            &["source=\"coaccess\""],
        )
        .is_some()
    })
    .await;
}

/// A follower another edge served lately is filled from that edge, as the follower's own miss
/// would be with peer fill on (and priced so), not from the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_another_edge_served_lately_is_filled_from_it() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster_with("[planner]\nbudget_share = 0.0001\n");
    c.register(&origin).await;
    c.learn_then_purge_the_script().await;
    // Orders of the last views still filling at the purge are done before the eu edge serves
    // the script, fetched from the origin; the broker has recorded that edge as its holder
    // before the next page view.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = c.logged().await;
    let r = c.get("/page/app.js", "eu").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(edge_of(&r).starts_with("eu-"), "{}", edge_of(&r));
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    let fetched = origin.hits("/page/app.js");

    // The next page view in us shadows the script on us-a, filled from that eu edge.
    assert_eq!(
        c.get("/page/index.html", "us").await.status(),
        StatusCode::OK
    );
    let key = format!("{HOST}/page/app.js");
    wait_until(|| c.shadowed_on(3, &key)).await;
    let peer_fills = || async {
        let m = text(format!("http://{}/metrics", c.edges[3].admin)).await;
        let fills = ["source=\"peer\""];
        sample(&m, "shadowcdn_edge_shadow_fill_sources_total", &fills)
    };
    wait_until(|| async { peer_fills().await == Some(1.0) }).await;
    assert_eq!(
        origin.hits("/page/app.js"),
        fetched,
        "the origin was spared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_request_shadows_the_assets_that_follow_it_under_their_own_keys() {
    let origin = TestOrigin::start().await;
    // Shadow budget: 1e-4 of 80 MiB ≈ 8 KiB per edge. The script's co-access probability at
    // the last page view, (follows + 1) / (views + 2), is 5/7 when all four follows of the
    // browse count and 4/7 when one does not, either side of the 0.6 precision floor: the
    // test also checks that a page recorded after its script (its response ended last) still
    // leads it.
    let mut c = start_cluster_with("[planner]\nbudget_share = 0.0001\n");
    c.register(&origin).await;
    // A client fetches the page, then its script and a video larger than the edge's whole
    // shadow budget, four times over; none of those views' co-access orders can refill the
    // script after the purge below.
    let paths = [
        "/page/index.html",
        "/page/app.js?v=2",
        "/page/clip.mp4?size=100000",
    ];
    c.browse_in_us(&paths, 4).await;
    let fetched = origin.hits("/page/app.js");
    // The script is asked for with a version query; purge it by prefix.
    let (s, v) = c
        .purge_with(json!({"host": HOST, "prefix": "/page/app"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // The next page view shadows the script on the us edge before it is asked for, with a
    // copy fetched again from the origin.
    assert_eq!(
        c.get("/page/index.html", "us").await.status(),
        StatusCode::OK
    );
    let key = format!("{HOST}/page/app.js?v=2");
    wait_until(|| c.shadowed_on(3, &key)).await;
    // Fetched again: once, or twice when the fourth view's order was still filling at the
    // purge and its fetch and the new order's both reached the origin.
    let refetched = origin.hits("/page/app.js");
    assert!(
        (fetched + 1..=fetched + 2).contains(&refetched),
        "{fetched} {refetched}"
    );
    let r = c.get("/page/app.js?v=2", "us").await;
    let shadow = r.headers().get("x-shadowcdn-shadow");
    assert_eq!(shadow.and_then(|v| v.to_str().ok()), Some("hit"), "{r:?}");
    assert_eq!(origin.hits("/page/app.js"), refetched);
    let m = c.metrics().await;
    assert!(
        sample(
            &m,
            "shadowcdn_broker_coaccess_shadows_total",
            &["outcome=\"ok\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert!(sample(&m, "shadowcdn_broker_coaccess_pairs", &[]).is_some_and(|n| n >= 1.0));
    // The script offered at the fourth view was asked for by the client: scored followed.
    assert!(
        sample(
            &m,
            "shadowcdn_broker_coaccess_offers_total",
            &["outcome=\"followed\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    // The video follows the page as surely, but would not fit the budget.
    assert!(
        sample(
            &m,
            "shadowcdn_broker_coaccess_shadows_total",
            &["outcome=\"too_large\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert!(
        c.not_shadowed_on(3, &format!("{HOST}/page/clip.mp4?size=100000"))
            .await
    );
}

/// A page's followers are shadowed as its request starts: while a slow origin is still
/// answering the page, its script is already on the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_still_being_answered_has_its_followers_shadowed() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    // The page takes 4 s from the origin on a miss; cached, it is answered at once.
    let page = "/early/index.html?delay_ms=4000";
    c.browse_in_us(&[page, "/early/app.js"], 4).await;
    let key = format!("{HOST}/early/app.js");
    // Followers the browsing ordered may reach the edge only after the purge, and fill the
    // script again there: purge until no fetch of it follows for a while.
    let fetched = loop {
        let before = origin.hits("/early/app.js");
        let (s, v) = c
            .purge_with(json!({"host": HOST, "prefix": "/early/"}))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        if origin.hits("/early/app.js") == before && c.not_shadowed_on(3, &key).await {
            break before;
        }
    };

    let view = tokio::spawn({
        let url = format!("http://{}{page}", c.broker.addr);
        async move {
            client()
                .get(url)
                .header("host", HOST)
                .header("x-client-region", "us")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    wait_until(|| c.shadowed_on(3, &key)).await;
    assert!(
        !view.is_finished(),
        "the script was shadowed only after the page was answered"
    );
    assert_eq!(origin.hits("/early/app.js"), fetched + 1);
    assert_eq!(view.await.unwrap(), StatusCode::OK);
    let r = c.get("/early/app.js", "us").await;
    assert_eq!(r.headers()["x-shadowcdn-shadow"], "hit");
    assert_eq!(origin.hits("/early/app.js"), fetched + 1);
}

/// A follower whose fills fail (the origin forbids caching it) is backed off like the
/// planner's own candidates: page views do not order it, and fetch it from the origin, again
/// and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_fills_fail_is_backed_off() {
    let origin = TestOrigin::start().await;
    // The planner applies the edges' failure reports on its ticks; no precision floor, which
    // would hold the follower back for reasons of its own.
    let cfg = format!("{}[cost]\nmin_precision = 0.0\n", lstm_planner(""));
    let mut c = start_cluster_with(&cfg);
    c.register(&origin).await;
    // A visit: the page, then the account call it makes.
    let pages = ["/acct/index.html", "/acct/me?cc=private"];
    c.browse_in_us(&pages, 4).await;
    let visit = || async {
        for path in pages {
            assert_eq!(c.get(path, "us").await.status(), StatusCode::OK);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let backed_off = || async {
        sample(
            &c.metrics().await,
            "shadowcdn_broker_coaccess_shadows_total",
            &["outcome=\"fill_backoff\""],
        )
        .is_some_and(|n| n >= 1.0)
    };
    // Visits go on as before.
    let reached = poll_secs(30, || async {
        visit().await;
        backed_off().await
    })
    .await;
    assert!(
        reached,
        "no follower backed off in 30 s\n{}",
        c.metrics().await
    );
    // Fifteen more visits (three seconds or more) order it a few times at most, each after
    // a longer wait (without the backoff: on every view).
    for _ in 0..15 {
        visit().await;
    }
    let m = c.metrics().await;
    let ordered = sample(
        &m,
        "shadowcdn_broker_coaccess_shadows_total",
        &["outcome=\"ok\""],
    )
    .unwrap_or(0.0);
    assert!((1.0..=8.0).contains(&ordered), "{ordered} orders: {m}");
    // The failed fills were no shadows, but what they spent is in the ledger: each ran a
    // fill (its compute) and fetched the body the origin then refused to let be kept.
    let (_, report) = api(
        reqwest::Method::GET,
        c.broker.api("/v1/cost"),
        OPERATOR_TOKEN,
        None,
    )
    .await;
    let co = report["by_source"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["source"] == "coaccess")
        .cloned()
        .unwrap();
    assert!(co["failed"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(co["shadows"], 0, "{report}");
    assert!(co["spend"].as_f64().unwrap() > 0.0, "{report}");
}

/// Co-access shadows respect the resource's `max_copies`: once the follower is shadowed in
/// one region, page views in another do not place a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn co_access_shadows_stay_within_the_policys_copies() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.add_resource(
        json!({"host": HOST, "path": "/one/", "match": "prefix", "priority": 5,
                          "policy": {"max_copies": 1}}),
    )
    .await;
    let key = format!("{HOST}/one/app.js");
    let views = |region: &'static str| {
        let c = &c;
        async move {
            for _ in 0..4 {
                for path in ["/one/index.html", "/one/app.js"] {
                    assert_eq!(c.get(path, region).await.status(), StatusCode::OK);
                }
            }
        }
    };
    views("us").await;
    assert_eq!(
        c.get("/one/index.html", "us").await.status(),
        StatusCode::OK
    );
    wait_until(|| c.shadowed_on(3, &key)).await;
    views("eu").await;
    assert_eq!(
        c.get("/one/index.html", "eu").await.status(),
        StatusCode::OK
    );
    let declined = || async {
        sample(
            &c.metrics().await,
            "shadowcdn_broker_coaccess_shadows_total",
            &["outcome=\"max_copies\""],
        )
        .is_some_and(|n| n >= 1.0)
    };
    wait_until(declined).await;
    for eu in 0..3 {
        assert!(
            c.not_shadowed_on(eu, &key).await,
            "a second copy on edge {eu}"
        );
    }
}

/// A key purged through the broker, by path, prefix or tag, or by a provider's update or delete
/// event, has no holders left to hint: the next miss elsewhere goes to the origin without
/// first asking a peer that no longer holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_key_is_not_hinted_to_a_peer() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let hints = || async {
        let m = c.metrics().await;
        sample(&m, "shadowcdn_broker_peer_hints_total", &[]).unwrap_or(0.0)
    };
    let purge = "/v1/purge";
    let event = "/v1/events";
    for (path, call, body) in [
        (
            "/forget.css",
            purge,
            json!({"host": HOST, "path": "/forget.css"}),
        ),
        (
            "/forget/by-prefix.css",
            purge,
            json!({"host": HOST, "prefix": "/forget/"}),
        ),
        (
            "/forget-tagged.css?skey=f1",
            purge,
            json!({"host": HOST, "tags": ["f1"]}),
        ),
        (
            "/forget-ev/updated.css",
            event,
            json!({"kind": "updated", "host": HOST, "prefix": "/forget-ev/"}),
        ),
        (
            "/forget-deleted.css",
            event,
            json!({"kind": "deleted", "host": HOST, "path": "/forget-deleted.css"}),
        ),
    ] {
        let n = c.logged().await;
        let r = c.get(path, "eu").await;
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.unwrap();
        c.wait_logged_past(n).await;
        let (s, v) = c.provider_post(call, body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let before = hints().await;
        let n = c.logged().await;
        let r = c.get(path, "us").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["x-cache"], "MISS", "{path}");
        r.bytes().await.unwrap();
        // Hints are counted as a request is logged.
        c.wait_logged_past(n).await;
        assert_eq!(
            hints().await,
            before,
            "no hint to a purged holder of {path}"
        );
        assert_eq!(origin.hits(path.split('?').next().unwrap()), 2, "{path}");
    }
}

/// A peer's copy cut off while it streams (the peer's own fill from the origin aborted) is
/// never stored by the edge that asked for it: that edge's client sees its body fail, the
/// fill counts as a peer error, and the next request is not answered from a truncated copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_copy_cut_off_while_it_streams_is_not_stored() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.wait_peers_listed(3).await;
    // Fresh for a second. The origin's first answer is whole; every later one is cut off
    // after 4 of its 7 chunks, sent 400 ms apart.
    let path = "/cut/k.bin?size=100000&chunked=1&chunk_delay_ms=400&fail_after=4&fail_from=2&cc=max-age%3D1";
    let n = c.logged().await;
    let r = c.get(path, "eu").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().len(), 100_000);
    // Its eu edge is recorded as a holder once the broker logged the request.
    c.wait_logged_past(n).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The copy went stale: the eu edge fetches it again, and the origin cuts this one off.
    let refill = {
        let url = format!("http://{}{path}", c.broker.addr);
        tokio::spawn(async move {
            let r = client()
                .get(url)
                .header("host", HOST)
                .header("x-client-region", "eu")
                .send()
                .await;
            match r {
                Ok(r) => r.bytes().await.map(|b| b.len()).ok(),
                Err(_) => None,
            }
        })
    };
    wait_until(|| async { origin.hits("/cut/k.bin") == 2 }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile a us client misses: the broker hints the eu edge, whose fill is streaming.
    let r = c.get(path, "us").await;
    assert_eq!(edge_of(&r), "us-a");
    assert_eq!(r.headers()["x-shadowcdn-fill"], "peer", "{r:?}");
    let body = r.bytes().await;
    assert!(body.is_err(), "a cut copy is not delivered whole: {body:?}");
    assert_eq!(
        refill.await.unwrap(),
        None,
        "the eu client's copy was cut too"
    );

    // us-a kept nothing of it.
    let r = c.on_edge(3, path).await;
    assert_ne!(r.headers()["x-cache"], "HIT");
    let _ = r.bytes().await;
    let us = c.edges[3].admin;
    wait_until(|| async {
        let m = text(format!("http://{us}/metrics")).await;
        let error = ["outcome=\"error\""];
        sample(&m, "shadowcdn_edge_demand_peer_fills_total", &error) == Some(1.0)
    })
    .await;
}

/// The first `{prefix}-{i}.css` that `edge` answers in region `eu`, asked until one is
/// (each one asked is then cached there); waited out at the broker, so its holder is recorded.
async fn served_in_eu_by(c: &Cluster, prefix: &str, edge: &str) -> String {
    for i in 0..32 {
        let path = format!("{prefix}-{i}.css");
        let n = c.logged().await;
        let r = c.get(&path, "eu").await;
        assert_eq!(r.status(), StatusCode::OK);
        let by = edge_of(&r);
        r.bytes().await.unwrap();
        c.wait_logged_past(n).await;
        if by == edge {
            return path;
        }
    }
    panic!("no {prefix}-* path routed to {edge}");
}

/// Restart edge `i`, named `name` (gracefully; with its disk tier's directory removed while
/// it is down if `wipe`), and wait until the broker has seen the new process, with its cache
/// `kept` or `emptied`, and routes to it again.
async fn restart_edge(c: &mut Cluster, i: usize, name: &str, cache: &str, wipe: bool) {
    let id = format!("edge=\"{name}\"");
    let cache = format!("cache=\"{cache}\"");
    let restarts =
        |m: &str| sample(m, "shadowcdn_broker_edge_restarts_total", &[&id, &cache]).unwrap_or(0.0);
    let before = restarts(&c.metrics().await);
    assert_eq!(c.edges[i].child.terminate(), Some(0));
    if wipe {
        std::fs::remove_dir_all(c.edges[i].dir.join("cache/foyer")).unwrap();
    }
    c.edges[i].spawn();
    wait_until(|| async { restarts(&c.metrics().await) > before }).await;
    c.wait_edge_up(name).await;
}

/// Peer hints the broker gave so far.
async fn peer_hints(c: &Cluster) -> f64 {
    sample(&c.metrics().await, "shadowcdn_broker_peer_hints_total", &[]).unwrap_or(0.0)
}

/// A miss of `path` in us: the broker's count of logged requests before it, and how the
/// edge filled it (`x-shadowcdn-fill`).
async fn miss_in_us(c: &Cluster, path: &str) -> (f64, Option<String>) {
    let n = c.logged().await;
    let r = c.get(path, "us").await;
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    assert_eq!(r.headers()["x-cache"], "MISS", "{path}");
    let fill = r.headers().get("x-shadowcdn-fill").cloned();
    r.bytes().await.unwrap();
    (n, fill.and_then(|v| v.to_str().ok().map(str::to_string)))
}

/// A miss of `path` (served once before, in eu) in us goes to the origin without a peer hint:
/// the broker's hint count stays `hints`.
async fn missed_in_us_unhinted(c: &Cluster, origin: &TestOrigin, path: &str, hints: f64) {
    let (n, fill) = miss_in_us(c, path).await;
    assert_eq!(fill, None, "{path} filled from the origin");
    c.wait_logged_past(n).await;
    assert_eq!(peer_hints(c).await, hints, "no hint for {path}");
    assert_eq!(origin.hits(path), 2, "{path}");
}

/// An edge restarted without a disk tier, from a process that had none, or with its disk
/// tier's directory gone, comes back empty:
/// the broker no longer hints it as a holder of what the old process served (a miss would ask
/// it for nothing), while one that keeps its cache on disk is still hinted, and each is hinted
/// again for what it serves anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_back_with_an_empty_cache_is_not_hinted_for_what_it_held() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.wait_peers_listed(3).await;
    // Its disk tier keeps the copy: still hinted after the restart, and filled from it.
    let n = c.logged().await;
    let r = c.get("/back/kept.css", "eu").await;
    let edge = edge_of(&r);
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    let i = ["eu-a", "eu-b"].iter().position(|e| *e == edge).unwrap();
    restart_edge(&mut c, i, &edge, "kept", false).await;
    let (n, fill) = miss_in_us(&c, "/back/kept.css").await;
    assert_eq!(fill.as_deref(), Some("peer"));
    c.wait_logged_past(n).await;
    assert_eq!(origin.hits("/back/kept.css"), 1);

    // Memory only from this start on: what it served before is gone, and not hinted.
    let lost = served_in_eu_by(&c, "/back/lost", &edge).await;
    c.edges[i].set_env("SHADOWCDN_EDGE_CACHE__DISK_CAPACITY", "0");
    restart_edge(&mut c, i, &edge, "emptied", false).await;
    let before = peer_hints(&c).await;
    missed_in_us_unhinted(&c, &origin, &lost, before).await;

    // What the new process serves, it is hinted for.
    let again = served_in_eu_by(&c, "/back/again", &edge).await;
    let (n, fill) = miss_in_us(&c, &again).await;
    assert_eq!(fill.as_deref(), Some("peer"));
    c.wait_logged_past(n).await;
    assert_eq!(peer_hints(&c).await, before + 1.0);
    assert_eq!(origin.hits(&again), 1);

    // Back to a disk tier: the memory-only process wrote nothing there, so its copies are
    // gone too.
    let gone = served_in_eu_by(&c, "/back/gone", &edge).await;
    c.edges[i].set_env("SHADOWCDN_EDGE_CACHE__DISK_CAPACITY", "64 MiB");
    restart_edge(&mut c, i, &edge, "emptied", false).await;
    missed_in_us_unhinted(&c, &origin, &gone, before + 1.0).await;

    // A disk tier whose directory went while the edge was down (a wiped disk, a recreated
    // volume): the edge starts with other content, and says so.
    let wiped = served_in_eu_by(&c, "/back/wiped", &edge).await;
    restart_edge(&mut c, i, &edge, "emptied", true).await;
    missed_in_us_unhinted(&c, &origin, &wiped, before + 1.0).await;
}

/// Wait until the broker has read a stats report of each of `edges` (its gauges are set in
/// the same step that judges the edge's cache).
async fn wait_stats_read(c: &Cluster, edges: &[&str]) {
    for edge in edges {
        wait_until(|| async {
            c.edge_gauge("shadowcdn_broker_edge_stats", edge)
                .await
                .is_some()
        })
        .await;
    }
}

/// A restarted broker still hints the copies its edges held before it stopped (it writes its
/// holders at its stop and reads them back at its start), also of an edge restarted with its
/// disk tier meanwhile, but not those of an edge whose disk tier was wiped while the broker
/// was away (its cache id is not the one the holders were kept with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_still_hints_what_the_edges_held() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    c.wait_peers_listed(3).await;
    let kept = served_in_eu_by(&c, "/held/kept", "eu-a").await;
    let lost = served_in_eu_by(&c, "/held/lost", "eu-b").await;
    // The holders are written with the edges' cache ids.
    wait_stats_read(&c, &["eu-a", "eu-b"]).await;
    assert_eq!(c.broker.child.terminate(), Some(0));
    for i in [0, 1] {
        assert_eq!(c.edges[i].child.terminate(), Some(0));
    }
    std::fs::remove_dir_all(c.edges[1].dir.join("cache/foyer")).unwrap();
    for i in [0, 1] {
        c.edges[i].spawn();
    }
    c.broker.spawn();
    for edge in ["eu-a", "eu-b", "us-a"] {
        c.wait_edge_up(edge).await;
    }
    wait_stats_read(&c, &["eu-a", "eu-b"]).await;
    missed_in_us_unhinted(&c, &origin, &lost, 0.0).await;
    let (n, fill) = miss_in_us(&c, &kept).await;
    assert_eq!(fill.as_deref(), Some("peer"), "{kept} filled from eu-a");
    c.wait_logged_past(n).await;
    assert_eq!(peer_hints(&c).await, 1.0);
    assert_eq!(origin.hits(&kept), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_filled_from_the_edge_of_another_region_that_served_it() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let us = &c.edges[3];
    let edge_token = shadowcdn_tests::cluster::EDGE_TOKEN;
    // The broker pushes each edge the peers it may fill from.
    c.wait_peers_listed(3).await;
    let get = |path: &'static str, region: &'static str, variant: &'static str| {
        client()
            .get(format!("http://{}{}", c.broker.addr, path))
            .header("host", HOST)
            .header("x-client-region", region)
            .header("x-variant", variant)
            .send()
    };

    // eu fetched it from the origin; us's first request is filled from that eu edge. Each
    // eu request is waited out at the broker: its hint exists once the broker logged it.
    let n = c.logged().await;
    let r = get("/coop/a.css", "eu", "-").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    let r = get("/coop/a.css", "us", "-").await.unwrap();
    assert_eq!(edge_of(&r), "us-a");
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.headers()["x-shadowcdn-fill"], "peer");
    let body = r.bytes().await.unwrap();
    assert_eq!(
        &body[..],
        &shadowcdn_tests::origin::body_for("/coop/a.css", 64)[..]
    );
    assert_eq!(origin.hits("/coop/a.css"), 1, "the origin was asked once");
    let r = get("/coop/a.css", "us", "-").await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert!(
        r.headers().get("x-shadowcdn-admitted").is_none(),
        "edges only"
    );

    // A text object whose clients take gzip: the peer hands its copy over as stored, tags
    // included, and the filled edge compresses it for its own client.
    let gzip = |path: &'static str, region: &'static str| {
        client()
            .get(format!("http://{}{}", c.broker.addr, path))
            .header("host", HOST)
            .header("x-client-region", region)
            .header("accept-encoding", "gzip")
            .send()
    };
    // One of its tags is not ASCII: the copy still travels with all of them.
    let css = "/coop/t.css?ct=text/css&skey=t9%20caf%C3%A9&size=4000";
    let n = c.logged().await;
    let r = gzip(css, "eu").await.unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    let r = gzip(css, "us").await.unwrap();
    assert_eq!(r.headers()["x-shadowcdn-fill"], "peer");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert!(r.headers().get("surrogate-key").is_none());
    let packed = r.bytes().await.unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&packed[..]), &mut plain).unwrap();
    assert_eq!(
        plain,
        shadowcdn_tests::origin::body_for("/coop/t.css", 4000)
    );
    assert_eq!(origin.hits("/coop/t.css"), 1);
    // The copy us-a stored from its peer kept the tag: a tag purge reaches it. The broker
    // no longer hints the host's holders (the eu copy went too).
    let (s, v) = c.purge_with(json!({"host": HOST, "tags": ["t9"]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = get(css, "us", "-").await.unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert!(r.headers().get("x-shadowcdn-fill").is_none());

    // A purge us-a applied and the eu peer has not yet: us-a acknowledged it, so the peer's
    // older copy does not answer this miss; the origin does. (eu serves its copy once more
    // first: the tag purge ended the broker's hints to holders of the host recorded before.)
    let n = c.logged().await;
    let r = get("/coop/a.css", "eu", "-").await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    let purge_on = |admin: std::net::SocketAddr, path: &'static str| {
        client()
            .delete(format!("http://{admin}/cache/{HOST}{path}"))
            .bearer_auth(edge_token)
            .send()
    };
    let s = purge_on(us.admin, "/coop/a.css").await.unwrap().status();
    assert_eq!(s, StatusCode::OK);
    let r = get("/coop/a.css", "us", "-").await.unwrap();
    assert!(r.headers().get("x-shadowcdn-fill").is_none());
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert!(
        r.headers().get("x-shadowcdn-admitted").is_none(),
        "edges only"
    );
    assert_eq!(origin.hits("/coop/a.css"), 2);
    let r = get("/coop/a.css", "us", "-").await.unwrap();
    assert_eq!(
        r.headers()["x-cache"],
        "HIT",
        "the origin's answer was stored"
    );

    // A hint that turns out wrong (the eu copy was purged behind the broker's back) costs
    // nothing but a round trip: the miss goes to the origin.
    let n = c.logged().await;
    let r = get("/coop/b.css", "eu", "-").await.unwrap();
    let eu = edge_of(&r);
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    let holder = c.edges.iter().find(|e| e.dir.ends_with(&eu)).unwrap();
    let s = purge_on(holder.admin, "/coop/b.css")
        .await
        .unwrap()
        .status();
    assert_eq!(s, StatusCode::OK);
    let r = get("/coop/b.css", "us", "-").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-shadowcdn-fill").is_none());
    let body = r.bytes().await.unwrap();
    assert_eq!(
        &body[..],
        &shadowcdn_tests::origin::body_for("/coop/b.css", 64)[..]
    );
    assert_eq!(origin.hits("/coop/b.css"), 2);

    // A Vary'd object is never taken from a peer, which chose its own variant.
    let n = c.logged().await;
    let r = get("/coop/v?vary=x-variant", "eu", "fr").await.unwrap();
    assert_eq!(r.text().await.unwrap(), "variant=fr");
    c.wait_logged_past(n).await;
    let r = get("/coop/v?vary=x-variant", "us", "de").await.unwrap();
    assert!(r.headers().get("x-shadowcdn-fill").is_none());
    assert_eq!(r.text().await.unwrap(), "variant=de");

    // A client cannot point an edge at a peer: an unlisted id is ignored.
    let r = client()
        .get(format!("http://{}/coop/c.css", us.addr))
        .header("host", HOST)
        .header("x-shadowcdn-peer-hint", "elsewhere")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(origin.hits("/coop/c.css"), 1);

    // A copy past its lifetime is not handed over, even within its stale-if-error window:
    // the origin answers instead.
    let stale = "/coop/stale.css?cc=max-age%3D1,stale-if-error%3D3600";
    let n = c.logged().await;
    let r = get(stale, "eu", "-").await.unwrap();
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = get(stale, "us", "-").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-shadowcdn-fill").is_none());
    assert_eq!(origin.hits("/coop/stale.css"), 2);

    // Nor is a stale copy of this edge's own revalidated through the peer: the origin is
    // asked, and the peer's refusal is not an origin error that lets the stale copy serve.
    let own = "/coop/own.css?cc=max-age%3D3,stale-if-error%3D3600";
    let r = get(own, "us", "-").await.unwrap();
    assert_eq!(r.headers()["x-cache"], "MISS");
    r.bytes().await.unwrap();
    let n = c.logged().await;
    let r = get(own, "eu", "-").await.unwrap();
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = get(own, "us", "-").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(r.headers()["x-cache"], "STALE", "the origin is up");
    // The eu copy came from this edge's, so this is the origin's second request.
    assert_eq!(origin.hits("/coop/own.css"), 2);

    let m = text(format!("http://{}/metrics", us.admin)).await;
    let fills = |o: &str| {
        sample(
            &m,
            "shadowcdn_edge_demand_peer_fills_total",
            &[&format!("outcome=\"{o}\"")],
        )
    };
    // From the peer: a.css and t.css once each. Refused or missing: a.css after the purge
    // (older than it), b.css, the Vary'd object, the stale copy. t.css after the tag purge
    // was not hinted.
    assert_eq!(fills("hit"), Some(2.0), "{m}");
    assert_eq!(fills("miss"), Some(4.0), "{m}");
    // Every GET to us-a for a key an eu edge served carries the hint, hits included, except
    // t.css's after the tag purge; own.css's GET to eu named us-a. (Counted as each request
    // is logged, just after its answer.)
    let hints = || async {
        let bm = c.metrics().await;
        sample(&bm, "shadowcdn_broker_peer_hints_total", &[])
    };
    poll_secs(5, || async { hints().await == Some(10.0) }).await;
    assert_eq!(hints().await, Some(10.0));
    // The peers' side: the fetches they answered, or refused for want of a usable copy, are
    // counted as peer fetches, neither as their clients' hits nor as errors.
    let (mut fetches, mut errors) = (0.0, 0.0);
    for e in &c.edges[..3] {
        let m = text(format!("http://{}/metrics", e.admin)).await;
        let count = |s: &str| {
            sample(
                &m,
                "shadowcdn_edge_requests_total",
                &[&format!("cache_status=\"{s}\"")],
            )
            .unwrap_or(0.0)
        };
        fetches += count("peer_fetch");
        errors += count("error");
    }
    assert!(fetches >= 5.0, "{fetches} peer fetches");
    assert_eq!(errors, 0.0);
}

/// A hinted peer that cannot be asked (its process stopped) is counted as an error, not as a
/// peer that lacks the copy, and the origin answers the miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hinted_peer_that_is_down_counts_as_an_error() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let us = c.edges[3].admin;
    c.wait_peers_listed(3).await;
    assert_eq!(c.edges[0].child.terminate(), Some(0));
    // Sent as the broker would (from a trusted address), naming the stopped eu-a.
    let r = client()
        .get(format!("http://{}/down/a.css", c.edges[3].addr))
        .header("host", HOST)
        .header("x-shadowcdn-peer-hint", "eu-a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert!(r.headers().get("x-shadowcdn-fill").is_none());
    r.bytes().await.unwrap();
    assert_eq!(origin.hits("/down/a.css"), 1);
    let m = text(format!("http://{us}/metrics")).await;
    let fills = |o: &str| {
        sample(
            &m,
            "shadowcdn_edge_demand_peer_fills_total",
            &[&format!("outcome=\"{o}\"")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (fills("hit"), fills("miss"), fills("error")),
        (0.0, 0.0, 1.0),
        "{m}"
    );
}

/// An edge takes peer hints only from the addresses it trusts (`server.trusted_proxies`, the
/// brokers'): from anywhere else the hint is ignored and the miss goes to the origin, so a
/// client that reaches an edge directly cannot send its misses to a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_takes_peer_hints_only_from_the_addresses_it_trusts() {
    let origin = TestOrigin::start().await;
    let mut c = start_cluster();
    c.register(&origin).await;
    let us = 3;
    assert_eq!(c.edges[us].child.terminate(), Some(0));
    c.edges[us].set_env(
        "SHADOWCDN_EDGE_SERVER__TRUSTED_PROXIES",
        "[\"192.0.2.0/24\"]",
    );
    c.edges[us].spawn();
    let admin = c.edges[us].admin;
    c.wait_peers_listed(us).await;
    c.wait_edge_up("us-a").await;
    let hints = || async {
        let m = c.metrics().await;
        sample(&m, "shadowcdn_broker_peer_hints_total", &[]).unwrap_or(0.0)
    };
    let n = c.logged().await;
    let r = c.get("/untrusted/a.css", "eu").await;
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.unwrap();
    c.wait_logged_past(n).await;
    let before = hints().await;
    // The broker hints the eu holder, but us-a does not trust the broker's loopback address.
    let r = c.get("/untrusted/a.css", "us").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(edge_of(&r), "us-a");
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert!(r.headers().get("x-shadowcdn-fill").is_none());
    r.bytes().await.unwrap();
    poll_secs(5, || async { hints().await == before + 1.0 }).await;
    assert_eq!(hints().await, before + 1.0, "the broker did hint");
    assert_eq!(origin.hits("/untrusted/a.css"), 2);
    let m = text(format!("http://{admin}/metrics")).await;
    assert_eq!(
        sample(&m, "shadowcdn_edge_peer_hints_untrusted_total", &[]),
        Some(1.0),
        "{m}"
    );
    for outcome in ["hit", "miss", "error"] {
        let n = sample(
            &m,
            "shadowcdn_edge_demand_peer_fills_total",
            &[&format!("outcome=\"{outcome}\"")],
        );
        assert!(n.unwrap_or(0.0) == 0.0, "{outcome}: {m}");
    }
}

/// Behind a trusted load balancer that terminates TLS, the origin hears the scheme the client
/// used and the access log names the client the balancer forwarded for; anyone else's claim
/// of HTTPS is replaced by the listener's scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_load_balancer_names_the_scheme_and_the_client() {
    let origin = TestOrigin::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let mut c = start_cluster_with(&format!(
        "access_log = \"{}\"\nclient_region.trusted_proxies = [\"127.0.0.0/8\"]\n",
        log.display()
    ));
    c.register(&origin).await;
    let send = |path: &'static str, proto: &'static str| {
        client()
            .get(format!("http://{}{path}", c.broker.addr))
            .header("host", HOST)
            .header("x-client-region", "us")
            .header("x-forwarded-proto", proto)
            .header("x-forwarded-for", "203.0.113.9")
            .send()
    };
    let r = send("/lb/page.css", "https").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = origin.last_headers("/lb/page.css").unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");
    let r = send("/lb/plain.css", "ftp").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = origin.last_headers("/lb/plain.css").unwrap();
    assert_eq!(
        seen["x-forwarded-proto"], "http",
        "only https or http is believed"
    );
    c.broker.child.terminate();
    let lines = std::fs::read_to_string(&log).unwrap();
    let line: Value = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["target"] == "/lb/page.css")
        .unwrap();
    assert_eq!(
        (&line["client"], &line["forwarded_for"]),
        (&json!("127.0.0.1"), &json!("203.0.113.9")),
        "{line}"
    );
}
