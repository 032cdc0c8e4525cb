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
