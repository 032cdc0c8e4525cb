//! An axum router served inside the pingora server, so it shares pingora's graceful
//! shutdown: the admin API, the peer-fill bridge, and the broker's provider API.

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

/// A router on a listener bound before start-up (a busy port is a clear start-up error).
pub struct AxumService {
    name: &'static str,
    listener: parking_lot::Mutex<Option<std::net::TcpListener>>,
    router: axum::Router,
}

impl AxumService {
    /// Serve `router` on `listener`; `name` appears in logs.
    pub fn new(name: &'static str, listener: std::net::TcpListener, router: axum::Router) -> Self {
        AxumService {
            name,
            listener: parking_lot::Mutex::new(Some(listener)),
            router,
        }
    }
}

#[async_trait]
impl BackgroundService for AxumService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(std_listener) = self.listener.lock().take() else {
            return;
        };
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|_| tokio::net::TcpListener::from_std(std_listener))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = self.name, error = %e, "listener unusable");
                return;
            }
        };
        let served = axum::serve(listener, self.router.clone())
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(service = self.name, error = %e, "listener failed");
        }
    }
}
