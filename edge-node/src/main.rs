//! `edge-node`: run one shadowcdn edge.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use clap::Parser;
use edge_node::config::{EdgeConfig, Overrides};
use edge_node::stop_signals::StopSignals;
use edge_node::EdgeNode;

/// mimalloc: the hit path allocates per request (headers, keys, futures), and glibc malloc
/// was ~12% of its profile (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// shadowcdn edge node: a caching HTTP reverse proxy (Pingora + foyer).
///
/// Configuration comes from the TOML file, then SHADOWCDN_EDGE_* environment variables
/// (sections joined by `__`, e.g. SHADOWCDN_EDGE_CACHE__DIR), then these flags.
#[derive(Parser, Debug)]
#[command(name = "edge-node", version)]
struct Cli {
    /// Path of the TOML configuration file.
    #[arg(short, long, env = "SHADOWCDN_EDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Override `server.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `admin.listen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Override `cache.dir`.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Override `server.threads`.
    #[arg(long)]
    threads: Option<usize>,
    /// Override `node_id`.
    #[arg(long)]
    node_id: Option<String>,
    /// Validate the configuration's values and exit (0, or 2 naming the bad field); touches
    /// no file but the config.
    #[arg(long)]
    check: bool,
    /// As `--check`, and also prove the cache directory writable (creating it if missing), the
    /// access log openable, the QUIC certificates loadable and the revocation list no older
    /// than the one enforced before: what a start opens besides its ports and the cache,
    /// writing no saved state.
    #[arg(long)]
    preflight: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Cluster certificates for QUIC (mutual TLS).
    #[command(subcommand)]
    Certs(Certs),
}

#[derive(clap::Subcommand, Debug)]
enum Certs {
    /// Create a cluster CA (`ca.pem`, `ca.key`) and its empty revocation list (`ca.crl`) in
    /// DIR.
    Ca {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = edge_node::sync::pki::CA_DAYS,
            value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
    },
    /// Issue a node certificate (`<name>.pem`, `<name>.key`) from the CA in `--ca-dir`.
    Issue {
        /// Directory holding `ca.pem` and `ca.key`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Node id: the edge's `node_id`, or any name for the broker.
        #[arg(long)]
        name: String,
        /// Issue the broker's certificate (may send control messages) instead of an edge's.
        #[arg(long)]
        broker: bool,
        /// Output directory (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid; renew by issuing again into the same files
        /// (nodes pick the new one up within 30 s).
        #[arg(long, default_value_t = edge_node::sync::pki::NODE_DAYS,
            value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
    },
    /// Revoke node certificates: add them to the CA's revocation list (`ca.crl` in
    /// `--ca-dir`, made with the CA) and sign it again. Nodes whose `crl` setting names the
    /// file read it every 30 s and then refuse the revoked ones, closing the connections
    /// they have with them. With no certificate the list is signed again as it is.
    Revoke {
        /// Directory holding `ca.pem`, `ca.key` and `ca.crl`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Start an empty list first, where there is none (a CA made before lists were; a
        /// lost list is better restored from a backup). Nodes still holding a list with a
        /// higher number (one made on a machine whose clock ran ahead) refuse the new one
        /// as older until they restart.
        #[arg(long)]
        init: bool,
        /// Certificate files (PEM) the CA issued.
        certs: Vec<PathBuf>,
    },
}

fn certs(c: Certs) -> ExitCode {
    use edge_node::sync::pki::{
        create_ca_valid_for, init_revocations, issue_valid_for, revoke, NodeRole,
    };
    let done = match c {
        Certs::Ca { dir, days } => {
            create_ca_valid_for(&dir, days).map(|()| format!("CA written to {}", dir.display()))
        }
        Certs::Revoke {
            ca_dir,
            init,
            certs,
        } => (if init {
            init_revocations(&ca_dir).map(|_| ())
        } else {
            Ok(())
        })
        .and_then(|()| revoke(&ca_dir, &certs))
        .map(|r| {
            format!(
                "{} revoked now, {} listed in {}",
                r.added,
                r.listed,
                r.path.display()
            )
        }),
        Certs::Issue {
            ca_dir,
            name,
            broker,
            out,
            days,
        } => {
            let role = if broker {
                NodeRole::Broker
            } else {
                NodeRole::Edge
            };
            let out = out.unwrap_or_else(|| ca_dir.clone());
            issue_valid_for(&ca_dir, &name, role, &out, days)
                .map(|p| format!("{} and {}", p.cert.display(), p.key.display()))
        }
    };
    match done {
        Ok(msg) => {
            println!("edge-node: {msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edge-node: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    // Logs go to stderr, like the broker's: stdout may carry the access log. The disk tier's
    // failed writes are counted from foyer's log, whatever the operator's filter shows.
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Counted first: a formatter that fails (stderr closed) must not keep it from counting.
    tracing_subscriber::registry()
        .with(edge_node::storage::disk_errors_layer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Command::Certs(c)) = cli.command {
        return certs(c);
    }
    let overrides = Overrides {
        listen: cli.listen,
        admin_listen: cli.admin_listen,
        cache_dir: cli.cache_dir,
        threads: cli.threads,
        node_id: cli.node_id,
    };
    let cfg = match EdgeConfig::load(cli.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-node: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check || cli.preflight {
        if cli.preflight {
            if let Err(e) = edge_node::server::preflight(&cfg) {
                eprintln!("edge-node: {e}");
                return ExitCode::from(2);
            }
        }
        let files = match (cli.preflight, cfg.sync.is_some()) {
            (false, _) => "values only; files and ports are opened at start",
            (true, false) => "cache directory writable, access log opens",
            (true, true) => {
                "cache directory writable, access log opens, QUIC certificates and revocation list load"
            }
        };
        println!(
            "edge-node: configuration OK ({} origins; {files})",
            cfg.origins.len()
        );
        return ExitCode::SUCCESS;
    }
    // Caught before the build: a stop asked for while the disk tier recovers waits for the
    // server instead of killing the process.
    let stop = match StopSignals::catch() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edge-node: cannot catch stop signals: {e}");
            return ExitCode::from(1);
        }
    };
    let node = match EdgeNode::build(cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("edge-node: {e}");
            return ExitCode::from(1);
        }
    };
    match node.run(stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-node: shutdown: {e}");
            ExitCode::from(1)
        }
    }
}
