//! Harness for shadowcdn's multi-process tests: a scriptable origin, real binaries started on
//! loopback ports picked at run time, and small HTTP helpers.

pub mod cluster;
pub mod origin;
pub mod process;

pub use origin::{OriginHandle, TestOrigin};
pub use process::{free_port, Binary, Child};

/// A reqwest client that never uses a proxy from the environment, keeps no connections
/// between tests and shows redirects as they came (a cache's answer, not where it leads).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("reqwest client builds with static options")
}

/// The value of the first sample of metric `name` whose line contains every one of
/// `labels` (e.g. `outcome="failed"`), in Prometheus text.
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The sum of every sample of metric `name` (all its label sets) in a Prometheus text page.
pub fn total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Start a server with `start` (not waiting for it to listen) and SIGTERM it as soon as it
/// catches the signal, until one signal lands while the server is still starting (its log
/// says so; at most 5 starts). Every stop must be graceful (exit 0). Returns that start's log.
pub fn stopped_while_starting(mut start: impl FnMut() -> Child) -> String {
    for _ in 0..5 {
        let mut child = start();
        // However slow the start (a debug build on a loaded machine): the signal must come
        // after the handler is installed, or it is the default action, not the server, that
        // answers it.
        let caught = child.wait_catching(
            rustix::process::Signal::TERM,
            std::time::Duration::from_secs(60),
        );
        assert!(caught, "the server never caught SIGTERM:\n{}", child.log());
        let code = child.terminate();
        let log = child.log();
        assert_eq!(code, Some(0), "not a graceful stop:\n{log}");
        if log.contains("stop signal during start-up") {
            return log;
        }
    }
    panic!("5 SIGTERMs sent as soon as the server caught them all came after its start-up");
}

/// Send `head` (a raw request head) to `addr` and read the whole answer until the server
/// closes: for requests an HTTP client will not send (`CONNECT` to a non-proxy).
pub async fn raw_exchange(addr: std::net::SocketAddr, head: String) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("read timeout");
        s.write_all(head.as_bytes()).expect("write the request");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("the exchange ran")
}

/// The body of `GET url` (a metrics page, a listing), failing the test if it does not answer.
pub async fn text(url: String) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Wait, failing the test after 10 s, until `f` holds.
pub async fn wait_until<F, Fut>(f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_secs(10, f).await
}

/// Wait, failing the test after `secs`, until `f` holds.
pub async fn wait_secs<F, Fut>(secs: u64, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        poll_secs(secs, f).await,
        "condition not reached in {secs} s"
    );
}

/// Whether `f` holds within `secs`, polled every 50 ms.
pub async fn poll_secs<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..secs * 20 {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}
