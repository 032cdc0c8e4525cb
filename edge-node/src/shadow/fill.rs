//! Shadow fills: a bounded queue of requests to pre-position objects, drained by a few
//! workers that fetch each object through this edge's own HTTP listener. Going through the
//! real cache path means a fill honours HTTP freshness and size limits and coalesces with user
//! misses of the same object under the cache lock; the concurrency limit keeps fills from
//! starving user traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::{mpsc, Semaphore};

use super::table::{Expired, ShadowTable};
use super::FILL_HEADER;
use crate::metrics::EdgeMetrics;
use crate::storage::FoyerStorage;

/// One object to shadow.
#[derive(Debug, Clone)]
pub struct FillRequest {
    /// Primary cache key, `host/path?query`.
    pub key: String,
    /// How long the shadow lives.
    pub ttl: Duration,
    /// Provider priority 0–10.
    pub priority: u8,
}

/// Why a fill request was refused.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// The queue is full.
    #[error("shadow fill queue is full")]
    QueueFull,
    /// The edge is shutting down.
    #[error("shadow filler stopped")]
    Stopped,
}

/// The handle the admin API submits fills through.
#[derive(Clone)]
pub struct Filler {
    tx: mpsc::Sender<FillRequest>,
}

impl Filler {
    /// Queue a fill without waiting.
    pub fn submit(&self, r: FillRequest) -> Result<(), FillError> {
        self.tx.try_send(r).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => FillError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => FillError::Stopped,
        })
    }
}

/// Background service: fill workers plus the expiry sweep.
pub struct ShadowService {
    rx: parking_lot::Mutex<Option<mpsc::Receiver<FillRequest>>>,
    table: Arc<ShadowTable>,
    storage: &'static FoyerStorage,
    metrics: EdgeMetrics,
    listen: SocketAddr,
    concurrency: usize,
}

impl ShadowService {
    /// A service filling through `listen` (this edge's proxy) with at most `concurrency`
    /// fills at once and `queue` waiting; returns it and the submission handle.
    pub fn new(
        table: Arc<ShadowTable>,
        storage: &'static FoyerStorage,
        metrics: EdgeMetrics,
        listen: SocketAddr,
        concurrency: usize,
        queue: usize,
    ) -> (Self, Filler) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        (
            ShadowService {
                rx: parking_lot::Mutex::new(Some(rx)),
                table,
                storage,
                metrics,
                listen,
                concurrency: concurrency.max(1),
            },
            Filler { tx },
        )
    }
}

/// Split `host/path?query` into host and path.
fn split_key(key: &str) -> Option<(&str, String)> {
    let (host, rest) = key.split_once('/')?;
    (!host.is_empty()).then(|| (host, format!("/{rest}")))
}

async fn fill_one(
    client: &reqwest::Client,
    listen: SocketAddr,
    r: &FillRequest,
) -> Result<u64, String> {
    let (host, path) = split_key(&r.key).ok_or_else(|| format!("bad key {:?}", r.key))?;
    let resp = client
        .get(format!("http://{listen}{path}"))
        .header("host", host)
        .header(FILL_HEADER, "1")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let cached = resp
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "BYPASS");
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    if !cached {
        return Err("origin response is not cacheable".into());
    }
    Ok(body.len() as u64)
}

#[async_trait]
impl BackgroundService for ShadowService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.rx.lock().take() else {
            return;
        };
        let client = match reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "shadow filler cannot build its HTTP client");
                return;
            }
        };
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = sweep.tick() => {
                    for e in self.table.expire(Instant::now()) {
                        match e {
                            Expired::Wasted(key) => {
                                self.storage.purge_key(&key);
                                self.metrics.shadows_expired.with_label_values(&["wasted"]).inc();
                            }
                            Expired::Used(_) => {
                                self.metrics.shadows_expired.with_label_values(&["used"]).inc();
                            }
                        }
                    }
                }
                req = rx.recv() => {
                    let Some(req) = req else { return };
                    let Ok(permit) = permits.clone().acquire_owned().await else { return };
                    let (client, table, metrics, listen) =
                        (client.clone(), self.table.clone(), self.metrics.clone(), self.listen);
                    tokio::spawn(async move {
                        let _permit = permit;
                        match fill_one(&client, listen, &req).await {
                            Ok(bytes) => {
                                table.mark(&req.key, req.ttl, req.priority, Instant::now());
                                table.set_bytes(&req.key, bytes);
                                metrics.shadow_fills.with_label_values(&["filled"]).inc();
                            }
                            Err(e) => {
                                tracing::warn!(key = %req.key, error = %e, "shadow fill failed");
                                metrics.shadow_fills.with_label_values(&["failed"]).inc();
                            }
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_host_and_path() {
        assert_eq!(
            split_key("h.com/a?b=1"),
            Some(("h.com", "/a?b=1".to_string()))
        );
        assert_eq!(split_key("h.com/"), Some(("h.com", "/".to_string())));
        assert_eq!(split_key("/a"), None);
        assert_eq!(split_key("nohost"), None);
    }
}
