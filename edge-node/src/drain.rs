//! Graceful shutdown: on SIGTERM pingora stops accepting; this waits for the requests still in
//! flight (up to a deadline), runs the owner's final step (the edge flushes its cache to disk)
//! and exits.
//!
//! pingora alone would sleep a fixed grace period and then cancel whatever is still running;
//! counting requests lets an idle edge stop at once and a busy one finish its responses.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

/// Counts requests in flight.
#[derive(Debug, Clone, Default)]
pub struct InflightCounter(Arc<AtomicUsize>);

/// Held by a request for its whole life; dropping it marks the request finished.
#[derive(Debug)]
pub struct InflightGuard(Arc<AtomicUsize>);

impl InflightCounter {
    /// Mark a request as started.
    pub fn enter(&self) -> InflightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self.0.clone())
    }

    /// Mark background work (a planning tick, a placement) as started unless shutdown has
    /// begun. Entering before the check closes the race with the drain: either the drain sees
    /// this work and waits for it, or the work sees the shutdown and does not start.
    pub fn enter_unless_shutdown(&self, shutdown: &ShutdownWatch) -> Option<InflightGuard> {
        let guard = self.enter();
        (!*shutdown.borrow()).then_some(guard)
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Axum middleware (`from_fn_with_state(counter, count_inflight)`) that counts an admin API
/// request as in flight until its handler answers, so SIGTERM lets a purge fan-out or a shadow
/// order finish instead of cutting it off.
pub async fn count_inflight(
    axum::extract::State(counter): axum::extract::State<InflightCounter>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let _guard = counter.enter();
    next.run(req).await
}

/// Run `work` in a task of its own, counted as in flight until it ends: a caller that hangs
/// up must not cut it short, and a drain waits for it.
pub async fn detached<T: Send + 'static>(
    inflight: &InflightCounter,
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let working = inflight.enter();
    tokio::spawn(async move {
        let _working = working;
        work.await
    })
    .await
}

/// Seconds pingora's grace period leaves the final step after a drain that ran its full
/// timeout (the broker's monitor snapshot, the edge's cache flush). The drainer exits the
/// process as soon as that step is done, so the grace period is only the backstop that
/// would cut it off: a few seconds would lose a large store's snapshot. The edge's step takes
/// at most about 67 s (peer connections closed, 2 s; shadow outcomes saved and the cache
/// flushed, 30 s each at most; the access log, 5 s). Deploy files give the service at least
/// drain + this + the runtime shutdown timeout to stop.
pub const FINISH_ALLOWANCE_SECS: u64 = 70;

/// How long no request may be in flight before the drain counts as done. pingora keeps
/// taking requests for a moment after the signal (a request already read on a kept-alive
/// HTTP/1 connection, an HTTP/2 stream opened before the client saw GOAWAY), and each counts
/// as in flight only once its first phase runs: one look at zero would exit under them.
const QUIET: Duration = Duration::from_millis(250);

/// The last step after draining; resolves to the process exit code.
pub type Finish = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = i32> + Send>> + Send>;

/// Background service that performs the drain-finish-exit sequence.
pub struct Drainer {
    inflight: InflightCounter,
    timeout: Duration,
    finish: parking_lot::Mutex<Option<Finish>>,
}

impl Drainer {
    /// Drain `inflight` for at most `timeout`, then run `finish` and exit with its code.
    pub fn new(inflight: InflightCounter, timeout: Duration, finish: Finish) -> Self {
        Drainer {
            inflight,
            timeout,
            finish: parking_lot::Mutex::new(Some(finish)),
        }
    }
}

/// Wait until no request has been in flight for [`QUIET`], or `timeout` passed; how many
/// are still in flight.
async fn drained(inflight: &InflightCounter, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut idle_since: Option<Instant> = None;
    loop {
        let n = inflight.count();
        if n == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= QUIET {
                return 0;
            }
        } else {
            idle_since = None;
        }
        if Instant::now() >= deadline {
            if n > 0 {
                tracing::warn!(in_flight = n, "drain timeout reached; closing anyway");
            }
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        drained(&self.inflight, self.timeout).await;
        tracing::info!("drained");
        let finish = self.finish.lock().take();
        let code = match finish {
            Some(f) => f().await,
            None => 0,
        };
        tracing::info!("stopped");
        // Everything that matters is finished; skip pingora's remaining fixed grace sleep.
        std::process::exit(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work a handler detaches runs to its end when its caller goes away, and counts as in
    /// flight (what a drain waits for) until then.
    #[tokio::test]
    async fn detached_work_outlives_its_caller_and_counts_until_it_ends() {
        let inflight = InflightCounter::default();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let done = Arc::new(AtomicUsize::new(0));
        let work = {
            let done = done.clone();
            async move {
                let _ = finished.await;
                done.store(1, Ordering::Release);
            }
        };
        let caller = detached(&inflight, work);
        // The caller hangs up before the work ends.
        let gone = tokio::time::timeout(Duration::from_millis(20), caller).await;
        assert!(gone.is_err());
        assert_eq!(inflight.count(), 1, "still in flight");
        finish.send(()).unwrap();
        while inflight.count() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(done.load(Ordering::Acquire), 1, "ran to its end");
    }

    #[test]
    fn guards_count() {
        let c = InflightCounter::default();
        let a = c.enter();
        let b = c.enter();
        assert_eq!(c.count(), 2);
        drop(a);
        drop(b);
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn background_work_does_not_start_once_shutdown_began() {
        let c = InflightCounter::default();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let busy = c.enter_unless_shutdown(&rx);
        assert!(busy.is_some());
        assert_eq!(c.count(), 1);
        drop(busy);
        tx.send(true).unwrap();
        assert!(c.enter_unless_shutdown(&rx).is_none());
        assert_eq!(c.count(), 0, "a refused entry leaves nothing counted");
    }

    #[tokio::test]
    async fn a_request_arriving_just_after_the_first_idle_moment_is_waited_for() {
        let c = InflightCounter::default();
        let late = c.clone();
        let started = Instant::now();
        let request = tokio::spawn(async move {
            tokio::time::sleep(QUIET / 10).await;
            let _guard = late.enter();
            tokio::time::sleep(QUIET).await;
        });
        assert_eq!(drained(&c, Duration::from_secs(10)).await, 0);
        assert!(request.is_finished(), "the drain ended under a request");
        assert!(started.elapsed() >= QUIET + QUIET / 10);
        // Bounded by the timeout.
        let _stuck = c.enter();
        assert_eq!(drained(&c, Duration::from_millis(50)).await, 1);
    }

    #[tokio::test]
    async fn an_admin_request_is_in_flight_until_it_answers() {
        use tower::ServiceExt;
        let c = InflightCounter::default();
        let seen = c.clone();
        let app = axum::Router::new()
            .route(
                "/purge",
                axum::routing::post(move || async move { seen.count().to_string() }),
            )
            .layer(axum::middleware::from_fn_with_state(
                c.clone(),
                count_inflight,
            ));
        let req = axum::extract::Request::post("/purge")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let body = axum::body::to_bytes(resp.into_body(), 64).await.unwrap();
        assert_eq!(&body[..], b"1");
        assert_eq!(c.count(), 0);
    }
}
