//! Assembles an edge from its configuration and runs it until shutdown.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::services::background::background_service;

use crate::access_log::{self, AccessLogWriter};
use crate::admin::{AdminState, BanCompactor, ShadowAdmin};
use crate::config::EdgeConfig;
use crate::drain::{Drainer, InflightCounter};
use crate::http_service::AxumService;
use crate::metrics::EdgeMetrics;
use crate::origin::SharedOrigins;
use crate::proxy::{CacheParts, CachePolicy, EdgeProxy, InternalSecret, ShadowHooks};
use crate::shadow::{
    crashed_processes, save_at_stop, RunningMark, SavedOutcomes, ShadowService, ShadowTable,
};
use crate::stop_signals::StopSignals;
use crate::storage::{DiskHealth, FillLock, FoyerStorage, StorageError, StorageOptions};
use crate::sync::{
    NodeIdentity, PeerBridge, PeerDirectory, PeerPool, SyncError, SyncParts, SyncService,
    KNOWN_ADDRESSES_FILE,
};

/// Why an edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The cache could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A listener address is taken or not ours.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// QUIC certificates or socket are unusable.
    #[error("sync: {0}")]
    Sync(#[from] SyncError),
    /// Runtime or metrics set-up failed.
    #[error("start-up: {0}")]
    Setup(String),
    /// The access log cannot be opened.
    #[error("server.access_log: cannot open {path}: {source}")]
    AccessLog {
        /// The configured target.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// In `cache.dir`: the CRL number of the QUIC revocation list last enforced, so a restart
/// refuses an older list as the running edge did.
pub const CRL_NUMBER_FILE: &str = "quic-crl-number.json";

/// Longest wait for the cache to flush and close at exit.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// What `--preflight` verifies beyond the configuration's own rules: that the files and
/// directories a start opens are usable — the cache directory writable, the access log
/// openable, the QUIC certificate, key and CA loadable and matching, the revocation list not
/// older than the one enforced before — without binding a port, opening the cache (a running
/// edge holds both) or writing state.
pub fn preflight(cfg: &EdgeConfig) -> Result<(), StartError> {
    crate::durable::check_writable_dir(&cfg.cache.dir)
        .map_err(|e| StartError::Setup(format!("cache.dir {}: {e}", cfg.cache.dir.display())))?;
    let log = cfg.server.access_log.as_deref();
    crate::access_log::check_configured(log).map_err(|source| StartError::AccessLog {
        path: log.unwrap_or_default().to_string(),
        source,
    })?;
    if let Some(sc) = &cfg.sync {
        let identity = NodeIdentity::load(&sc.tls_paths()).map_err(SyncError::from)?;
        identity.server_config().map_err(SyncError::from)?;
        identity
            .check_list_number(&cfg.cache.dir.join(CRL_NUMBER_FILE))
            .map_err(SyncError::from)?;
    }
    Ok(())
}

/// A configured edge, ready to run.
pub struct EdgeNode {
    cfg: EdgeConfig,
    server: Server,
    storage: &'static FoyerStorage,
    storage_rt: tokio::runtime::Runtime,
    /// The last stop's shadow outcomes were restored: their file goes once serving starts.
    restored_outcomes: bool,
    /// This process, marked running once serving starts.
    running: RunningMark,
    /// The drain's last step began flushing the cache. The drainer ends the process when that
    /// step is done; `run` goes on only when pingora's grace period cut the step off, and then
    /// does not flush again (the cut-off flush is left unfinished, as in a crash: a second
    /// one would run past the service manager's stop timeout).
    flushed_at_stop: Arc<std::sync::atomic::AtomicBool>,
}

impl EdgeNode {
    /// Open the cache, bind the listeners and build the services.
    pub fn build(cfg: EdgeConfig) -> Result<Self, StartError> {
        let origins = Arc::new(
            SharedOrigins::new(cfg.origins.clone())
                .map_err(crate::config::ConfigError::from)?
                .remembering_pushes(&cfg.cache.dir),
        );
        // Bind-check the proxy port now so a busy port is a clear start-up error.
        TcpListener::bind(cfg.server.listen).map_err(|source| StartError::Bind {
            what: "server.listen",
            addr: cfg.server.listen,
            source,
        })?;
        let admin_listener =
            TcpListener::bind(cfg.admin.listen).map_err(|source| StartError::Bind {
                what: "admin.listen",
                addr: cfg.admin.listen,
                source,
            })?;

        // QUIC: identity, UDP socket, and the loopback bridge peer fills go through.
        let sync = match &cfg.sync {
            Some(sc) => {
                let identity = NodeIdentity::load(&sc.tls_paths()).map_err(SyncError::from)?;
                identity
                    .remember_list_number(&cfg.cache.dir.join(CRL_NUMBER_FILE))
                    .map_err(SyncError::from)?;
                let server_cfg = identity.server_config().map_err(SyncError::from)?;
                let socket =
                    std::net::UdpSocket::bind(sc.listen).map_err(|source| StartError::Bind {
                        what: "sync.listen",
                        addr: sc.listen,
                        source,
                    })?;
                let loopback: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
                let bridge = TcpListener::bind(loopback).map_err(|source| StartError::Bind {
                    what: "peer bridge",
                    addr: loopback,
                    source,
                })?;
                Some((identity, server_cfg, socket, bridge))
            }
            None => None,
        };
        let bridge_addr = match &sync {
            Some((_, _, _, bridge)) => Some(
                bridge
                    .local_addr()
                    .map_err(|e| StartError::Setup(e.to_string()))?,
            ),
            None => None,
        };

        // foyer's flushers and reclaimers get a runtime of their own, outside pingora's
        // per-service runtimes, so they keep running through pingora's shutdown until we
        // close the cache.
        let storage_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("foyer")
            .enable_all()
            .build()
            .map_err(|e| StartError::Setup(e.to_string()))?;
        let registry = prometheus::Registry::new();
        let metrics =
            EdgeMetrics::register(&registry).map_err(|e| StartError::Setup(e.to_string()))?;
        if let Some((identity, ..)) = &sync {
            identity
                .register_metrics(
                    &registry,
                    crate::sync::tls::IdentityMetricNames {
                        expiry: "shadowcdn_edge_quic_cert_expiry_timestamp_seconds",
                        revoked: "shadowcdn_edge_quic_revoked_certificates",
                        list_refused: "shadowcdn_edge_quic_revocation_list_refused",
                    },
                )
                .map_err(|e| StartError::Setup(e.to_string()))?;
        }
        if cfg.cache.large_objects_crowd_shards() {
            tracing::warn!(
                max_object_size = %cfg.cache.max_object_size,
                memory_shards = cfg.cache.memory_shards(),
                "cache.max_object_size is over half a memory shard: storing or reading back \
                 an object that large evicts most of its shard"
            );
        }
        let opts = StorageOptions {
            dir: cfg.cache.dir.clone(),
            memory_bytes: cfg.cache.memory_capacity.as_u64() as usize,
            memory_shards: cfg.cache.memory_shards(),
            disk_bytes: cfg.cache.disk_capacity.as_u64() as usize,
            block_size: cfg.block_size(),
            max_object_bytes: cfg.cache.max_object_size.as_u64() as usize,
            max_fill_bytes: cfg.cache.max_fill_memory.as_u64() as usize,
            ban_retention: Duration::from_secs(cfg.cache.ban_retention_secs),
        };
        let spawner = foyer::Spawner::from(storage_rt.handle().clone());
        let storage = storage_rt.block_on(FoyerStorage::open(&opts, spawner, &registry))?;
        let disk = DiskHealth::start(
            &cfg.cache.dir,
            Duration::from_secs(cfg.cache.disk_stall_secs),
            metrics.disk_probe.clone(),
        )
        .map_err(|e| StartError::Setup(format!("disk probe: {e}")))?;
        storage.watch_disk(disk.clone());
        // The hosts the broker pushed before the stop are served from the first request,
        // not only after its next push; an unreadable file waits for that push instead.
        match storage_rt.block_on(origins.restore()) {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "origin rows of the last push restored"),
            Err(e) => tracing::warn!(error = %e, "the last origin push is not restored"),
        }
        // pingora-cache requires 'static storage, lock and predictor; they live for the
        // process, exactly like the server itself.
        let storage: &'static FoyerStorage = Box::leak(Box::new(storage));
        let lock = Box::leak(Box::new(FillLock::new(Duration::from_secs(
            cfg.cache.lock_timeout_secs,
        ))));
        let predictor = storage.predictor();

        let conf = ServerConf {
            threads: cfg.server.threads,
            work_stealing: cfg.server.work_stealing,
            // The drainer exits as soon as requests are done; pingora's own grace period is
            // only the backstop behind it.
            grace_period_seconds: Some(
                cfg.server.drain_timeout_secs + crate::drain::FINISH_ALLOWANCE_SECS,
            ),
            graceful_shutdown_timeout_seconds: Some(cfg.server.shutdown_timeout_secs),
            pid_file: cfg
                .cache
                .dir
                .join("edge.pid")
                .to_string_lossy()
                .into_owned(),
            upgrade_sock: cfg
                .cache
                .dir
                .join("upgrade.sock")
                .to_string_lossy()
                .into_owned(),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let policy = CachePolicy {
            default_ttl: Duration::from_secs(cfg.cache.default_ttl_secs),
            stale_while_revalidate_secs: cfg.cache.stale_while_revalidate_secs,
            stale_if_error_secs: cfg.cache.stale_if_error_secs,
            max_object_bytes: opts.max_object_bytes,
            lock_timeout: Duration::from_secs(cfg.cache.lock_timeout_secs),
            connect_timeout: Duration::from_secs(cfg.server.origin_connect_timeout_secs),
            read_timeout: Duration::from_secs(cfg.server.origin_read_timeout_secs),
        };
        let inflight = InflightCounter::default();
        let shadows = Arc::new(ShadowTable::default());
        // What the last graceful stop left for the broker: reported from the first poll.
        let saved = SavedOutcomes::load(&cfg.cache.dir);
        let crashed = crashed_processes(&cfg.cache.dir, &saved);
        if !crashed.is_empty() {
            tracing::warn!(
                processes = ?crashed,
                "the last process ended without a graceful stop: the broker is told that the \
                 shadows it (and the processes it took over from) held will not be reported, \
                 and prices them itself"
            );
            for boot_id in crashed {
                shadows.outcomes().lost(boot_id);
            }
        }
        let restored_outcomes = match saved {
            Ok(Some(saved)) => {
                tracing::info!(
                    outcomes = saved.len(),
                    "shadow outcomes of the last stop restored for the broker"
                );
                shadows.outcomes().restore(saved);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "shadow outcomes of the last stop not restored");
                false
            }
        };
        let running = RunningMark::of(shadows.outcomes());
        let secret = InternalSecret::generate();
        let peers = Arc::new(PeerDirectory::new(&cfg.node_id));
        let encodings = Arc::new(crate::accept_encoding::Mix::default());
        let proxy = EdgeProxy::new(
            cfg.node_id.clone(),
            origins.clone(),
            CacheParts {
                storage,
                lock,
                predictor,
            },
            policy,
            metrics.clone(),
            inflight.clone(),
            ShadowHooks {
                table: shadows.clone(),
                secret: secret.clone(),
                bridge: bridge_addr,
                peers: peers.clone(),
                encodings: encodings.clone(),
            },
        )
        .with_trusted_proxies(cfg.server.trusted_proxies.clone())
        .with_compression(cfg.server.compression_level);
        let (proxy, access_log) = match access_log::open_configured(
            cfg.server.access_log.as_deref(),
            metrics.access_log_dropped.clone(),
        )
        .map_err(|source| StartError::AccessLog {
            path: cfg.server.access_log.clone().unwrap_or_default(),
            source,
        })? {
            Some((log, writer)) => (proxy.with_access_log(log), Some(writer)),
            None => (proxy, None),
        };
        let mut proxy_service = pingora_proxy::http_proxy_service_with_name(
            &server.configuration,
            proxy,
            "shadowcdn-edge",
        );
        proxy_service.add_tcp(&cfg.server.listen.to_string());
        if let Some(app) = proxy_service.app_logic_mut() {
            app.server_options = Some(crate::proxy::server_options());
        }

        let (shadow_service, filler) = ShadowService::new(
            shadows.clone(),
            storage,
            metrics.clone(),
            cfg.server.listen,
            secret.clone(),
            &cfg.shadow,
            inflight.clone(),
        );
        let shadow_service = shadow_service.asking_like(encodings);
        let mut peer_pool = None;
        if let Some((identity, server_cfg, socket, bridge)) = sync {
            let parts = SyncParts {
                node_id: cfg.node_id.clone(),
                storage,
                shadows: shadows.clone(),
                filler: filler.clone(),
                metrics: metrics.clone(),
                max_ttl_secs: cfg.shadow.max_ttl_secs,
                proxy_listen: cfg.server.listen,
                internal: secret,
                capacity_bytes: cfg.cache.memory_capacity.as_u64()
                    + cfg.cache.disk_capacity.as_u64(),
                memory_only: cfg.cache.disk_capacity.as_u64() == 0,
                cache_id: storage.content_id(),
                origins: origins.clone(),
                inflight: inflight.clone(),
                drain_timeout: Duration::from_secs(cfg.server.drain_timeout_secs),
                trust: identity.trust().clone(),
            };
            server.add_service(background_service(
                "quic",
                SyncService::new(socket, identity.endpoint_config(), server_cfg, parts)
                    .remembering_addresses_in(cfg.cache.dir.join(KNOWN_ADDRESSES_FILE)),
            ));
            let pool = Arc::new(PeerPool::new(identity));
            peer_pool = Some(pool.clone());
            server.add_service(background_service(
                "peer-bridge",
                AxumService::new("peer-bridge", bridge, PeerBridge::new(pool).router())
                    .without_field_limits(),
            ));
        }
        let admin_state = AdminState::new(
            &cfg.node_id,
            &cfg.admin.token,
            storage,
            origins,
            registry,
            metrics,
            ShadowAdmin {
                table: shadows.clone(),
                filler,
                max_ttl_secs: cfg.shadow.max_ttl_secs,
            },
        )
        .with_peers(peers)
        .watching_disk(disk)
        .counting(inflight.clone());
        let admin = background_service(
            "admin",
            AxumService::new(
                "admin",
                admin_listener,
                crate::admin::router(admin_state).layer(axum::middleware::from_fn_with_state(
                    inflight.clone(),
                    crate::drain::count_inflight,
                )),
            ),
        );
        server.add_service(background_service("ban-compactor", BanCompactor(storage)));

        let (stopping_shadows, outcomes_dir) = (shadows, cfg.cache.dir.clone());
        let flushed_at_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flushing = flushed_at_stop.clone();
        let drainer = background_service(
            "drain",
            Drainer::new(
                inflight,
                Duration::from_secs(cfg.server.drain_timeout_secs),
                Box::new(move || {
                    Box::pin(async move {
                        // Peers drop their connections to this edge now, not at their idle
                        // timeout.
                        if let Some(pool) = peer_pool {
                            pool.close().await;
                        }
                        save_outcomes(&stopping_shadows, outcomes_dir).await;
                        tracing::info!("flushing cache to disk");
                        flushing.store(true, std::sync::atomic::Ordering::SeqCst);
                        // Bounded like the close at exit: a stalled disk must not outlast
                        // the service manager's stop timeout.
                        let code = match tokio::time::timeout(CLOSE_TIMEOUT, storage.close()).await
                        {
                            Ok(Ok(())) => 0,
                            Ok(Err(e)) => {
                                tracing::error!(error = %e, "cache flush failed");
                                1
                            }
                            Err(_) => {
                                tracing::warn!(
                                    secs = CLOSE_TIMEOUT.as_secs(),
                                    "cache flush timed out"
                                );
                                1
                            }
                        };
                        // Last, just before the process ends: requests that still came in
                        // during the flush (pingora serves what was already on a
                        // connection) get their lines too.
                        finish_access_log(access_log).await;
                        code
                    })
                }),
            ),
        );
        server.add_service(proxy_service);
        server.add_service(admin);
        server.add_service(background_service("shadow", shadow_service));
        server.add_service(drainer);
        Ok(EdgeNode {
            cfg,
            server,
            storage,
            storage_rt,
            restored_outcomes,
            running,
            flushed_at_stop,
        })
    }

    /// Serve until SIGTERM (graceful: in-flight requests finish) or SIGINT (pingora's fast
    /// stop: no drain, so its shadows are told lost at the next start, as after a crash), then
    /// flush the cache to disk and return. `stop` is caught before the build, so a signal
    /// during start-up stops the edge as soon as it is up.
    pub fn run(self, stop: StopSignals) -> Result<(), StorageError> {
        tracing::info!(
            node = %self.cfg.node_id,
            listen = %self.cfg.server.listen,
            admin = %self.cfg.admin.listen,
            cache_dir = %self.cfg.cache.dir.display(),
            "edge-node serving"
        );
        // Marked first: a crash between the two leaves the mark, not a start that lost the
        // outcomes it took up without telling.
        let marked = self.running.write(&self.cfg.cache.dir);
        if let Err(e) = &marked {
            tracing::warn!(error = %e, "cannot note the process as running: were it to crash, \
                the broker would not learn that its shadows are lost (the restored outcomes' \
                file is kept, to be reported again rather than lost unnamed)");
        }
        if self.restored_outcomes && marked.is_ok() {
            if let Err(e) = SavedOutcomes::taken(&self.cfg.cache.dir) {
                tracing::warn!(error = %e, "restored shadow outcomes' file not removed: a later \
                    start reports them again");
            }
        }
        self.server.run(stop.run_args());
        if self
            .flushed_at_stop
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // Pingora's grace period ended during or after the drain's flush: not flushed again.
            tracing::warn!(
                "server stopped after the drain's cache flush began; not flushing again"
            );
        } else {
            tracing::info!("server stopped; flushing cache");
            // Bounded: a stalled disk must not keep the process from exiting (what foyer did
            // not write by then is lost as in a crash; purges were durable before they were
            // answered).
            let closing = async { tokio::time::timeout(CLOSE_TIMEOUT, self.storage.close()).await };
            match self.storage_rt.block_on(closing) {
                Ok(closed) => closed?,
                Err(_) => tracing::warn!(secs = CLOSE_TIMEOUT.as_secs(), "cache close timed out"),
            }
        }
        self.storage_rt.shutdown_timeout(Duration::from_secs(5));
        tracing::info!("edge-node stopped");
        Ok(())
    }
}

/// End the shadow marks and save what the broker has not acknowledged for the next start
/// ([`save_at_stop`]), bounded like the cache's close.
async fn save_outcomes(shadows: &ShadowTable, dir: std::path::PathBuf) {
    match tokio::time::timeout(CLOSE_TIMEOUT, save_at_stop(shadows, dir)).await {
        Ok(Ok((marks, outcomes))) if outcomes > 0 => tracing::info!(
            marks,
            outcomes,
            "shadow marks ended; outcomes the broker has not acknowledged saved for the next start"
        ),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "shadow outcomes not saved: the broker will not price them")
        }
        Err(_) => {
            tracing::warn!("saving shadow outcomes timed out: the broker will not price them")
        }
    }
}

/// Write the access lines still queued and stop the writer (the drain calls it last, before the
/// process ends; a line logged after it is counted as dropped).
pub async fn finish_access_log(writer: Option<AccessLogWriter>) {
    if let Some(w) = writer {
        let _ = tokio::task::spawn_blocking(move || w.finish(Duration::from_secs(5))).await;
    }
}
