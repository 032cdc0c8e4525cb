//! Assembles a broker from its configuration and runs it until shutdown.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use edge_node::drain::{Drainer, InflightCounter};
use edge_node::http_service::AxumService;
use edge_node::stop_signals::StopSignals;
use parking_lot::Mutex;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::services::background::background_service;

use crate::config::BrokerConfig;
use crate::control::{Control, ControlService};
use crate::cost::{Ledger, Source};
use crate::kept_holders::{HoldersKeeper, HoldersKeeperService, HOLDERS_FILE};
use crate::metrics::BrokerMetrics;
use crate::monitor::{CoAccessFeed, Monitor};
use crate::planner::{Planner, PlannerState};
use crate::proxy::BrokerProxy;
use crate::redelivery::Redelivery;
use crate::registry::api::{metrics_router, router, ApiState};
use crate::registry::limits::ApiLimits;
use crate::registry::model::check_public_host;
use crate::registry::{Registry, RegistryError};
use crate::routing::{Fleet, Health, HealthChecker, Holders, RegionResolver};
use crate::signals::{CoAccessParts, CoAccessService};
use crate::sync::{EdgeSync, OriginPusher, PurgeRedeliverer};
use crate::taken_tables::TakenTables;
use edge_node::access_log;

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The registry could not be opened.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A certificate for the HTTPS listener is unusable.
    #[error(transparent)]
    Certificate(#[from] crate::tls::CertError),
    /// A listener address is taken.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Anything else during start-up.
    #[error("start-up: {0}")]
    Setup(String),
    /// The access log cannot be opened.
    #[error("access_log: cannot open {path}: {source}")]
    AccessLog {
        /// The configured target.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What `broker run --preflight` verifies beyond the configuration's own rules: that the files
/// and directories a start opens are usable — `data_dir` writable, the access log openable,
/// the HTTPS certificates and the QUIC identity loadable, the revocation list not older than
/// the one enforced before, the saved purge queues and edge certificates readable — without
/// binding a port, opening the registry (a running broker holds both) or writing state.
pub fn preflight(cfg: &BrokerConfig) -> Result<(), StartError> {
    edge_node::durable::check_writable_dir(&cfg.data_dir)
        .map_err(|e| StartError::Setup(format!("data_dir {}: {e}", cfg.data_dir.display())))?;
    let log = cfg.access_log.as_deref();
    access_log::check_configured(log).map_err(|source| StartError::AccessLog {
        path: log.unwrap_or_default().to_string(),
        source,
    })?;
    if let Some(tls) = &cfg.tls {
        crate::tls::SniResolver::load(tls)?;
    }
    if let Some(c) = &cfg.control {
        c.check(&cfg.data_dir, cfg.edges.iter().map(|e| e.id.as_str()))
            .map_err(|e| StartError::Setup(format!("control: {e}")))?;
    }
    Redelivery::check(&cfg.data_dir.join(PENDING_PURGES_FILE))
        .map_err(|e| StartError::Setup(format!("pending purges {e}")))?;
    Ok(())
}

/// In `data_dir`: purges some edge has yet to acknowledge ([`Redelivery`]).
const PENDING_PURGES_FILE: &str = "pending-purges.json";

/// A configured broker.
pub struct Broker {
    cfg: BrokerConfig,
    server: Server,
}

impl Broker {
    /// Open the registry, start the monitor, bind listeners and build the services.
    pub fn build(cfg: BrokerConfig) -> Result<Self, StartError> {
        crate::clock::init(&cfg.clock);
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| StartError::Setup(format!("data_dir {}: {e}", cfg.data_dir.display())))?;
        TcpListener::bind(cfg.listen).map_err(|source| StartError::Bind {
            what: "listen",
            addr: cfg.listen,
            source,
        })?;
        // Certificates first: a bad file is reported before anything else starts.
        let certs = match &cfg.tls {
            Some(tls) => {
                TcpListener::bind(tls.listen).map_err(|source| StartError::Bind {
                    what: "tls.listen",
                    addr: tls.listen,
                    source,
                })?;
                Some(Arc::new(crate::tls::SniResolver::load(tls)?))
            }
            None => None,
        };
        let admin_listener =
            TcpListener::bind(cfg.admin.listen).map_err(|source| StartError::Bind {
                what: "admin.listen",
                addr: cfg.admin.listen,
                source,
            })?;

        let metrics_listener = match cfg.admin.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|source| StartError::Bind {
                what: "admin.metrics_listen",
                addr,
                source,
            })?),
            None => None,
        };

        let prometheus = prometheus::Registry::new();
        let metrics =
            BrokerMetrics::register(&prometheus).map_err(|e| StartError::Setup(e.to_string()))?;
        let registry = Arc::new(
            Registry::open(&cfg.data_dir.join("registry.redb"))?
                .with_max_resources_per_provider(cfg.admin.max_resources_per_provider)
                .with_max_origins_per_provider(cfg.admin.max_origins_per_provider),
        );
        metrics.host_claims.set(registry.claim_count() as i64);
        if registry.created() {
            tracing::warn!(
                path = %cfg.data_dir.join("registry.redb").display(),
                "the registry did not exist and was created empty; edges keep the origin tables \
                 they hold until a host is registered here (check data_dir if this broker had \
                 providers)"
            );
        }
        // Hosts registered before the public-name rule applied (or before the operator turned
        // local names off) keep working and their owners can update them; say so once.
        for o in registry.origins() {
            if let Err(e) = check_public_host(&o.host, cfg.admin.allow_local_hosts) {
                tracing::warn!(host = %o.host, provider = %o.provider, "registered host would be refused now: {e}");
            }
        }
        let fleet = Arc::new(Fleet::new(&cfg));
        let health = Arc::new(Health::new(
            fleet.edges.len(),
            cfg.health.fall,
            cfg.health.rise,
        ));
        // An edge whose name does not resolve yet starts down; a probe brings it up.
        fleet
            .addresses
            .resolve_at_start(&fleet.edges, Duration::from_secs(5));
        for e in 0..fleet.edges.len() {
            let now = fleet.addresses.get(e);
            if now.proxy.is_none() || now.admin.is_none() {
                tracing::warn!(edge = %fleet.edges[e].id, "edge name does not resolve yet");
                health.mark_down(e);
            }
        }
        let cr = &cfg.client_region;
        let public = !cfg.listen.ip().is_loopback()
            || cfg
                .tls
                .as_ref()
                .is_some_and(|t| !t.listen.ip().is_loopback());
        if cr.trust_header && cr.trusted_proxies.is_empty() && public {
            tracing::warn!(
                header = %cr.header,
                "client_region.trust_header is on with no trusted_proxies: any client can pick \
                 its region (and which edges serve it); list the load balancers that set the \
                 header in client_region.trusted_proxies"
            );
        }
        let regions = RegionResolver::new(&cfg.client_region, &fleet);
        let (coaccess_tx, coaccess_rx) = tokio::sync::mpsc::channel(1024);
        let coaccess = cfg.signals.coaccess.enabled.then(|| CoAccessFeed {
            cfg: cfg.signals.coaccess.clone(),
            triggers: coaccess_tx,
        });
        let (monitor, recorder) = Monitor::start(
            &cfg.monitor,
            fleet.regions.clone(),
            cfg.data_dir.join("monitor.json"),
            metrics.clone(),
            coaccess,
        );
        let ledger = Arc::new(
            Ledger::new(
                cfg.cost.clone(),
                cfg.planner.threshold,
                fleet.regions.clone(),
                metrics.clone(),
            )
            .offering_from(
                Source::Coaccess,
                cfg.signals.coaccess.min_probability as f32,
            )
            .offering_from(Source::Anomaly, 0.0),
        );
        // Shared by the proxy's peer hints and co-access's fills; the control link drops the
        // holders an edge restarted without.
        let holders = cfg
            .peer_fill
            .enabled
            .then(|| Arc::new(Holders::new(&cfg.peer_fill)));
        let control = match &cfg.control {
            Some(c) => {
                let control = Control::new(
                    c,
                    &cfg.data_dir,
                    fleet.clone(),
                    ledger.clone(),
                    metrics.clone(),
                    health.clone(),
                )
                .map_err(|e| StartError::Setup(format!("control: {e}")))?
                .forgetting_holders(holders.clone());
                control
                    .register_metrics(&prometheus)
                    .map_err(|e| StartError::Setup(e.to_string()))?;
                Some(Arc::new(control))
            }
            None => None,
        };
        // Read back before the first request is recorded; written last at stop, after the drain.
        if holders.is_none() {
            crate::kept_holders::remove_left(&cfg.data_dir.join(HOLDERS_FILE));
        }
        let keeper = holders.as_ref().map(|h| {
            Arc::new(HoldersKeeper::restoring(
                h.clone(),
                cfg.data_dir.join(HOLDERS_FILE),
                fleet.clone(),
                control.clone(),
                cfg.peer_fill.snapshot_secs,
            ))
        });
        let inflight = InflightCounter::default();
        let sync = Arc::new(
            EdgeSync::new(
                fleet.clone(),
                registry.clone(),
                cfg.admin.edge_token.clone(),
                metrics.clone(),
                control.clone(),
            )
            .allowing_private_upstreams(cfg.admin.allow_private_upstreams)
            .keeping_hosts_off(health.clone())
            .remembering_tables(Arc::new(TakenTables::open(
                cfg.data_dir.join("edge-tables.json"),
                &fleet
                    .edges
                    .iter()
                    .map(|e| e.id.as_str())
                    .collect::<Vec<_>>(),
                metrics.clone(),
            )))
            .redelivering(Arc::new(
                Redelivery::open(
                    cfg.data_dir.join(PENDING_PURGES_FILE),
                    fleet.clone(),
                    health.clone(),
                    metrics.clone(),
                )
                .map_err(|e| StartError::Setup(format!("pending purges {e}")))?,
            ))
            .counting_in(inflight.clone()),
        );

        let conf = ServerConf {
            threads: cfg.threads,
            // A backstop behind the drainer, which exits once the monitor is saved.
            grace_period_seconds: Some(
                cfg.drain_timeout_secs + edge_node::drain::FINISH_ALLOWANCE_SECS,
            ),
            graceful_shutdown_timeout_seconds: Some(5),
            // A plan tries each edge at most once, then up to three of the origin's
            // addresses, plus a few retries of pooled connections a peer had closed:
            // pingora's default of 16 would leave the origin out of reach behind a region and
            // neighbours of 16 edges.
            max_retries: cfg.edges.len()
                + crate::proxy::MAX_ORIGIN_ADDRS
                + usize::from(crate::proxy::MAX_POOLED_RETRIES),
            pid_file: cfg
                .data_dir
                .join("broker.pid")
                .to_string_lossy()
                .into_owned(),
            upgrade_sock: cfg
                .data_dir
                .join("upgrade.sock")
                .to_string_lossy()
                .into_owned(),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let proxy = BrokerProxy::new(
            fleet.clone(),
            health.clone(),
            regions,
            registry.clone(),
            recorder,
            cfg.segment_header.clone(),
            metrics.clone(),
            inflight.clone(),
            holders.clone(),
        )
        .allowing_private_upstreams(cfg.admin.allow_private_upstreams)
        .with_edge_read_timeout(Duration::from_secs(cfg.edge_read_timeout_secs));
        let (proxy, access_log) = match access_log::open_configured(
            cfg.access_log.as_deref(),
            metrics.access_log_dropped.clone(),
        )
        .map_err(|source| StartError::AccessLog {
            path: cfg.access_log.clone().unwrap_or_default(),
            source,
        })? {
            Some((log, writer)) => (proxy.with_access_log(log), Some(writer)),
            None => (proxy, None),
        };
        let mut proxy_service = pingora_proxy::http_proxy_service_with_name(
            &server.configuration,
            proxy,
            "shadowcdn-broker",
        );
        proxy_service.add_tcp(&cfg.listen.to_string());
        // One app serves both listeners: its options are set once, HTTP/2's idle time with TLS.
        let mut options = edge_node::proxy::server_options();
        let mut cert_reloader = None;
        if let (Some(tls), Some(resolver)) = (&cfg.tls, certs) {
            let mut settings = TlsSettings::intermediate("", "")
                .map_err(|e| StartError::Setup(format!("tls: {e}")))?;
            settings.set_cert_resolver(resolver.clone());
            settings.enable_h2();
            proxy_service.add_tls_with_settings(&tls.listen.to_string(), None, settings);
            options.h2_idle_timeout = Some(Duration::from_secs(tls.h2_idle_timeout_secs));
            cert_reloader = Some(crate::tls::CertReloader::new(
                resolver,
                metrics.tls_cert_expiry.clone(),
            ));
        }
        if let Some(app) = proxy_service.app_logic_mut() {
            app.server_options = Some(options);
        }

        let planner_state = Arc::new(PlannerState::default());
        let planner = Planner::new(
            cfg.planner.clone(),
            fleet.clone(),
            health.clone(),
            registry.clone(),
            monitor.store(),
            sync.clone(),
            planner_state.clone(),
            (ledger.clone(), cfg.signals.anomaly.clone()),
            metrics.clone(),
        )
        .counting_in(inflight.clone());
        let coaccess = CoAccessService::new(
            CoAccessParts {
                fleet: fleet.clone(),
                health: health.clone(),
                registry: registry.clone(),
                sync: sync.clone(),
                planner: planner_state.clone(),
                ledger: ledger.clone(),
                planner_cfg: cfg.planner.clone(),
                metrics: metrics.clone(),
                holders: holders.clone(),
            },
            coaccess_rx,
        )
        .counting_in(inflight.clone());
        let store = registry.clone();
        let api_state = ApiState {
            ledger,
            registry,
            fleet: fleet.clone(),
            health: health.clone(),
            sync: sync.clone(),
            series: monitor.store(),
            operator_token: cfg.admin.operator_token.as_str().into(),
            max_body: cfg.admin.max_body_bytes,
            allow_private_upstreams: cfg.admin.allow_private_upstreams,
            allow_local_hosts: cfg.admin.allow_local_hosts,
            approve_new_hosts: cfg.admin.approve_new_hosts,
            prometheus: prometheus.clone(),
            metrics: metrics.clone(),
            planner: planner_state,
            limits: Arc::new(ApiLimits::new(&cfg.admin.rate_limits)),
            inflight: inflight.clone(),
            holders,
        };
        let api_router = router(api_state).layer(axum::middleware::from_fn_with_state(
            inflight.clone(),
            edge_node::drain::count_inflight,
        ));
        let api = AxumService::new("api", admin_listener, api_router);
        let kept = keeper.clone();
        let checker = HealthChecker::new(fleet, health, cfg.health.clone(), metrics)
            .map_err(|e| StartError::Setup(format!("health checker: {e}")))?;
        let monitor = Mutex::new(Some(monitor));
        let closing = control.clone();
        let drainer = Drainer::new(
            inflight,
            Duration::from_secs(cfg.drain_timeout_secs),
            Box::new(move || {
                let monitor = monitor.lock().take();
                Box::pin(async move {
                    // A final step that panicked makes the exit code 1: a supervisor must
                    // not read such a stop as clean.
                    let mut code = 0;
                    if let Some(m) = monitor {
                        if let Err(e) = tokio::task::spawn_blocking(move || m.shutdown()).await {
                            tracing::error!(error = %e, "the monitor's final snapshot failed");
                            code = 1;
                        }
                    }
                    if let Some(c) = closing {
                        c.close().await;
                    }
                    // After the control link closed: no stats poll changes an edge's cache id
                    // or floor under the write.
                    if let Some(k) = kept {
                        if let Err(e) = tokio::task::spawn_blocking(move || k.save()).await {
                            tracing::error!(error = %e, "the peer holders' final write failed");
                        }
                    }
                    // After the drain no API change is in flight; closed, the store needs no
                    // repair at the next start.
                    if let Err(e) = tokio::task::spawn_blocking(move || store.close()).await {
                        tracing::error!(error = %e, "the registry store did not close");
                        code = 1;
                    }
                    // Last, just before the process ends: the last access lines reach the log.
                    edge_node::server::finish_access_log(access_log).await;
                    code
                })
            }),
        );
        server.add_service(proxy_service);
        server.add_service(background_service("api", api));
        if let Some(listener) = metrics_listener {
            let scrape = AxumService::new("metrics", listener, metrics_router(prometheus));
            server.add_service(background_service("metrics", scrape));
        }
        server.add_service(background_service("health", checker));
        if let Some(reloader) = cert_reloader {
            server.add_service(background_service("cert-reload", reloader));
        }
        server.add_service(background_service(
            "origin-push",
            OriginPusher(sync.clone()),
        ));
        server.add_service(background_service(
            "purge-redelivery",
            PurgeRedeliverer(sync),
        ));
        server.add_service(background_service("planner", planner));
        server.add_service(background_service("coaccess", coaccess));
        server.add_service(background_service("drain", drainer));
        if let Some(k) = keeper {
            server.add_service(background_service(
                "holders-keeper",
                HoldersKeeperService(k),
            ));
        }
        if let Some(c) = control {
            server.add_service(background_service("control", ControlService(c)));
        }
        Ok(Broker { cfg, server })
    }

    /// Serve until SIGTERM (drain, snapshot the monitor, exit) or SIGINT. `stop` is caught
    /// before the build, so a signal during start-up stops the broker as soon as it is up.
    pub fn run(self, stop: StopSignals) {
        tracing::info!(
            listen = %self.cfg.listen,
            admin = %self.cfg.admin.listen,
            edges = self.cfg.edges.len(),
            "broker serving"
        );
        self.server.run(stop.run_args());
    }
}
