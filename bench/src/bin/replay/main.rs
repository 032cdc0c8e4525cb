//! `replay`: drive a running shadowcdn cluster from a real trace and report what it did.
//!
//! Requests keep their order and relative timing, compressed `--speedup` times (the broker
//! must run its `[clock]` at the same speed from the trace's first timestamp, printed by
//! `--first-ts`); objects keep their traced size (the bench origin's `--sizes`, written by
//! `--write-sizes`, so URLs and cache keys are the trace's own); clients are
//! assigned to regions by `fnv1a64(client) % 2`. The report (JSON, appended per run to
//! `--out`) has the hit ratios, origin bytes, shadow precision/recall, the cost ledger's net
//! and client latency.

mod trace;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// Replay a trace against a cluster.
#[derive(Parser, Debug)]
#[command(name = "replay")]
struct Cli {
    /// `apache` or `nasa`.
    #[arg(long)]
    trace: String,
    /// Directory of the shared traces.
    #[arg(long, default_value = "../shared/traces")]
    traces_dir: PathBuf,
    /// Print the trace's first timestamp and working set, then exit.
    #[arg(long)]
    first_ts: bool,
    /// Write the trace's `size path` lines (for `origin --sizes`) to this file, then exit.
    #[arg(long)]
    write_sizes: Option<PathBuf>,
    /// Trace seconds per wall second.
    #[arg(long, default_value_t = 1800.0)]
    speedup: f64,
    /// The broker's user address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    broker: String,
    /// The broker's provider API.
    #[arg(long, default_value = "http://127.0.0.1:7081")]
    api: String,
    /// Operator token (for `/v1/cost`).
    #[arg(long, default_value = "")]
    operator_token: String,
    /// The origin (for its byte counter).
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    origin: String,
    /// Edge admin addresses (`host:port`), comma-separated, for their metrics.
    #[arg(long, value_delimiter = ',')]
    edges: Vec<String>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Only the first N requests.
    #[arg(long)]
    limit: Option<usize>,
    /// Label of this run (`plain`, `baseline`, `lstm`).
    #[arg(long, default_value = "run")]
    mode: String,
    /// Cache bytes per region, recorded in the report.
    #[arg(long, default_value_t = 0)]
    cache_bytes: u64,
    /// Report file; runs are appended (a run with the same mode and size is replaced).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Default)]
struct Tally {
    requests: u64,
    errors: u64,
    hits: u64,
    shadow_hits: u64,
    bytes: u64,
    hit_bytes: u64,
    max_lag: Duration,
}

fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get_text(client: &reqwest::Client, url: &str, token: Option<&str>) -> String {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn origin_bytes(client: &reqwest::Client, origin: &str) -> u64 {
    let s = get_text(client, &format!("{origin}/_origin/stats"), None).await;
    serde_json::from_str::<Value>(&s)
        .ok()
        .and_then(|v| v["bytes"].as_u64())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let trace = trace::load(&cli.traces_dir, &cli.trace)?;
    let mut reqs = trace.requests.clone();
    if let Some(n) = cli.limit {
        reqs.truncate(n);
    }
    let first = reqs.first().context("empty trace")?.ts;
    if let Some(f) = &cli.write_sizes {
        let mut seen = std::collections::HashSet::new();
        let mut out = String::new();
        for r in &trace.requests {
            if seen.insert(r.path.as_str()) {
                out.push_str(&format!("{} {}\n", r.size, r.path));
            }
        }
        std::fs::write(f, out).with_context(|| format!("write {}", f.display()))?;
        return Ok(());
    }
    if cli.first_ts {
        println!("{first} {} {}", trace.working_set(), reqs.len());
        return Ok(());
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(cli.concurrency)
        .timeout(Duration::from_secs(120))
        .build()?;
    let origin_before = origin_bytes(&client, &cli.origin).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let pb = ProgressBar::new(reqs.len() as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}) {msg}",
        )?
        .progress_chars("=> "),
    );
    pb.set_prefix(format!("{} {}", cli.trace, cli.mode));
    let permits = Arc::new(Semaphore::new(cli.concurrency.max(1)));
    let started = Instant::now();
    let regions = ["eu", "us"];
    for r in &reqs {
        let due = started + Duration::from_secs_f64((r.ts - first) as f64 / cli.speedup);
        tokio::time::sleep_until(due.into()).await;
        let permit = permits.clone().acquire_owned().await?;
        let lag = Instant::now().saturating_duration_since(due);
        let url = format!("{}{}", cli.broker, r.path);
        let (client, tally, hist, pb) = (client.clone(), tally.clone(), hist.clone(), pb.clone());
        let region = regions[usize::from(r.region)];
        let host = trace.host;
        tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let resp = client
                .get(&url)
                .header("host", host)
                .header("x-client-region", region)
                .send()
                .await;
            let (ok, hit, shadow, mut bytes) = match resp {
                Ok(mut resp) if resp.status().is_success() => {
                    let x = resp
                        .headers()
                        .get("x-cache")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let shadow = resp.headers().contains_key("x-shadowcdn-shadow");
                    let mut n = 0u64;
                    let mut ok = true;
                    loop {
                        match resp.chunk().await {
                            Ok(Some(c)) => n += c.len() as u64,
                            Ok(None) => break,
                            Err(_) => {
                                ok = false;
                                break;
                            }
                        }
                    }
                    let hit = matches!(x.as_str(), "HIT" | "STALE" | "STALE-UPDATING");
                    (ok, hit, shadow, n)
                }
                _ => (false, false, false, 0),
            };
            let us = t.elapsed().as_micros() as u64;
            let _ = hist.lock().record(us.max(1));
            let mut s = tally.lock();
            s.requests += 1;
            s.max_lag = s.max_lag.max(lag);
            if !ok {
                s.errors += 1;
                bytes = 0;
            }
            s.bytes += bytes;
            if hit {
                s.hits += 1;
                s.hit_bytes += bytes;
            }
            if shadow {
                s.shadow_hits += 1;
            }
            drop(s);
            pb.inc(1);
        });
    }
    let _all = permits.acquire_many(cli.concurrency.max(1) as u32).await?;
    let wall = started.elapsed();
    pb.finish_with_message("done");
    // Let the broker's stats polls collect the shadows that ended.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let origin_after = origin_bytes(&client, &cli.origin).await;
    let metrics = get_text(&client, &format!("{}/metrics", cli.api), None).await;
    let cost_text = get_text(
        &client,
        &format!("{}/v1/cost", cli.api),
        Some(&cli.operator_token),
    )
    .await;
    let cost: Value = serde_json::from_str(&cost_text).unwrap_or(Value::Null);
    let (mut spend, mut savings, mut shadows, mut used, mut shadow_bytes, mut used_bytes) =
        (0.0, 0.0, 0u64, 0u64, 0u64, 0u64);
    for r in cost["rollups"].as_array().into_iter().flatten() {
        spend += r["spend"].as_f64().unwrap_or(0.0);
        savings += r["savings"].as_f64().unwrap_or(0.0);
        shadows += r["shadows"].as_u64().unwrap_or(0);
        used += r["used"].as_u64().unwrap_or(0);
        shadow_bytes += r["bytes"].as_u64().unwrap_or(0);
        used_bytes += r["used_bytes"].as_u64().unwrap_or(0);
    }
    let mut fills = (0.0, 0.0);
    for e in &cli.edges {
        let m = get_text(&client, &format!("http://{e}/metrics"), None).await;
        fills.0 += sample(&m, "shadowcdn_edge_shadow_fill_sources_total", &["origin"]);
        fills.1 += sample(&m, "shadowcdn_edge_shadow_fill_sources_total", &["peer"]);
    }
    let s = tally.lock();
    let h = hist.lock();
    let origin = origin_after.saturating_sub(origin_before);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let run = json!({
        "trace": cli.trace,
        "mode": cli.mode,
        "speedup": cli.speedup,
        "cache_bytes_per_region": cli.cache_bytes,
        "requests": s.requests,
        "errors": s.errors,
        "wall_secs": wall.as_secs_f64(),
        "max_lag_ms": s.max_lag.as_secs_f64() * 1000.0,
        "hit_ratio": ratio(s.hits, s.requests),
        "byte_hit_ratio": ratio(s.hit_bytes, s.bytes),
        "requested_bytes": s.bytes,
        "origin_bytes": origin,
        "byte_miss_ratio": ratio(origin, s.bytes),
        "shadow_hits": s.shadow_hits,
        "shadow_fills": { "origin": fills.0, "peer": fills.1 },
        "shadows_settled": shadows,
        "shadows_used": used,
        "precision_bytes": ratio(used_bytes, shadow_bytes),
        "recall": sample(&metrics, "shadowcdn_broker_shadow_recall", &[]),
        "cost": { "spend": spend, "savings": savings, "net": savings - spend },
        "latency_ms": {
            "p50": h.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": h.value_at_quantile(0.99) as f64 / 1000.0,
        },
    });
    println!("{}", serde_json::to_string_pretty(&run)?);
    if let Some(out) = &cli.out {
        let mut report: Value = std::fs::read(out)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| json!({ "runs": [] }));
        let runs = report["runs"]
            .as_array_mut()
            .context("report has no runs array")?;
        runs.retain(|r| {
            !(r["mode"] == run["mode"]
                && r["cache_bytes_per_region"] == run["cache_bytes_per_region"]
                && r["trace"] == run["trace"])
        });
        runs.push(run);
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}
