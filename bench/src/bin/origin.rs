//! `origin`: the demo and benchmark origin server.
//!
//! Serves files under `--root` when one exists at the request path, otherwise a deterministic
//! body of `?size=N` bytes (default 1024). Every response is cacheable for `--max-age`
//! seconds and carries an ETag, and `If-None-Match` gets a 304, so edges can revalidate.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use clap::Parser;

/// Demo/benchmark origin for shadowcdn.
#[derive(Parser, Debug)]
#[command(name = "origin", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Directory of real files to serve (optional).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Cache-Control max-age of every response.
    #[arg(long, default_value_t = 300)]
    max_age: u64,
    /// Largest synthetic body served, in bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    max_size: usize,
    /// File of `size path` lines: the body size of each path (trace replays, so request URLs
    /// carry no `?size=` and cache keys are the trace's own).
    #[arg(long)]
    sizes: Option<PathBuf>,
}

struct Ctx {
    root: Option<PathBuf>,
    max_age: u64,
    max_size: usize,
    sizes: std::collections::HashMap<String, usize>,
    /// Bodies sent (200s), for a replay's origin-bytes measurement.
    served: std::sync::atomic::AtomicU64,
    served_bytes: std::sync::atomic::AtomicU64,
}

/// `GET /_origin/stats`: responses with a body and their bytes since start.
async fn stats(State(ctx): State<Arc<Ctx>>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let body = format!(
        "{{\"responses\":{},\"bytes\":{}}}",
        ctx.served.load(Relaxed),
        ctx.served_bytes.load(Relaxed)
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(body))
        .expect("static response parts")
}

fn synthetic(path: &str, size: usize) -> Vec<u8> {
    let seed = path
        .bytes()
        .fold(7u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..size)
        .map(|i| b'a' + ((i as u8).wrapping_add(seed) % 26))
        .collect()
}

/// Map a URL path to a file under `root`, refusing `..` and absolute components.
fn file_under(root: &Path, url_path: &str) -> Option<PathBuf> {
    let rel = Path::new(url_path.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let p = root.join(rel);
    p.is_file().then_some(p)
}

/// The media type a web server would give a file of this extension (so the edges compress
/// the text ones for clients that accept it); `application/octet-stream` otherwise.
fn media_type(file: &Path) -> &'static str {
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" | "mjs" => "application/javascript",
        "json" => "application/json",
        "md" => "text/markdown; charset=utf-8",
        "txt" | "log" => "text/plain; charset=utf-8",
        "yaml" | "yml" => "application/yaml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "mp4" => "video/mp4",
        _ => "application/octet-stream",
    }
}

fn error(status: StatusCode, msg: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!("{{\"error\":{msg:?}}}")))
        .expect("static response parts")
}

async fn serve(State(ctx): State<Arc<Ctx>>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    let (body, content_type) = match ctx.root.as_deref().and_then(|r| file_under(r, path)) {
        Some(file) => match tokio::fs::read(&file).await {
            Ok(b) => (b, media_type(&file)),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        None => {
            let size = match uri
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("size=")))
            {
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if n <= ctx.max_size => n,
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "size must be an integer ≤ --max-size",
                        )
                    }
                },
                None => ctx.sizes.get(path).copied().unwrap_or(1024),
            };
            (synthetic(path, size), "text/plain")
        }
    };
    let etag = format!(
        "\"{:x}-{}\"",
        body.iter()
            .fold(0u64, |h, b| h.wrapping_mul(1099511628211) ^ *b as u64),
        body.len()
    );
    let mut resp = Response::builder()
        .header(
            header::CACHE_CONTROL,
            format!("public, max-age={}", ctx.max_age),
        )
        .header(header::ETAG, &etag);
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return resp
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .expect("static response parts");
    }
    ctx.served
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.served_bytes
        .fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
    resp = resp
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len());
    resp.body(Body::from(body)).expect("static response parts")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let mut sizes = std::collections::HashMap::new();
    if let Some(f) = &cli.sizes {
        let text = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let (size, path) = line
                .split_once(' ')
                .with_context(|| format!("{}:{}: expected `size path`", f.display(), n + 1))?;
            let size: usize = size
                .parse()
                .with_context(|| format!("{}:{}: bad size", f.display(), n + 1))?;
            sizes.insert(path.to_string(), size.min(cli.max_size));
        }
    }
    let ctx = Arc::new(Ctx {
        sizes,
        root: cli.root,
        max_age: cli.max_age,
        max_size: cli.max_size,
        served: Default::default(),
        served_bytes: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(listen = %cli.listen, "origin serving");
    let app = axum::Router::new()
        .route("/_origin/stats", axum::routing::get(stats))
        .fallback(serve)
        .with_state(ctx);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler installs");
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        })
        .await?;
    Ok(())
}
