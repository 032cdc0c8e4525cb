//! `edge-node`: run one shadowcdn edge.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use edge_node::config::{EdgeConfig, Overrides};
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
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
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
    if cli.check {
        println!(
            "edge-node: configuration OK ({} origins)",
            cfg.origins.len()
        );
        return ExitCode::SUCCESS;
    }
    let node = match EdgeNode::build(cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("edge-node: {e}");
            return ExitCode::from(1);
        }
    };
    match node.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-node: shutdown: {e}");
            ExitCode::from(1)
        }
    }
}
