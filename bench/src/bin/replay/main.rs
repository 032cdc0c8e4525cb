//! `replay`: drive a running shadowcdn cluster from a real trace and report what it did.
//!
//! Requests keep their order and relative timing, compressed `--speedup` times (the broker
//! must run its `[clock]` at the same speed from the trace's first timestamp, printed by
//! `--first-ts`); objects keep their traced size (the bench origin's `--sizes`, written by
//! `--write-sizes`, so URLs and cache keys are the trace's own); clients are
//! assigned to regions by `fnv1a64(client) % 2`. The report (JSON, appended per run to
//! `--out`) has the hit ratios, origin bytes, shadow precision/recall, the cost ledger's net
//! and client latency: `latency_ms` from the request's send, `latency_from_schedule_ms` from
//! its traced (compressed) time, which also counts the wait for one of the `--concurrency`
//! slots and the replayer's own lateness (no coordinated omission). While it replays it samples the broker's cost ledger (`GET /v1/cost`)
//! and recall every `--sample-secs` of trace time; the report's `timeline` has, per sample,
//! the cumulative spend/savings/net, byte precision and recall, overall and per (region,
//! priority class) with the threshold in force (`bench/offline/timeline.py` plots it).

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
#[derive(Parser, Debug, Clone)]
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
    /// Operator token (for `/v1/cost` and the broker's `/metrics`).
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
    /// Label of this run (`plain`, `peer`, `baseline`, `lstm`).
    #[arg(long, default_value = "run")]
    mode: String,
    /// Cache bytes per region, recorded in the report.
    #[arg(long, default_value_t = 0)]
    cache_bytes: u64,
    /// The edges' largest cached object, recorded in the report.
    #[arg(long, default_value_t = 0)]
    max_object_bytes: u64,
    /// Report file; runs are appended (a run with the same mode and size is replaced).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Sample the broker's cost ledger every this many trace seconds (0: only at the end).
    #[arg(long, default_value_t = 3600)]
    sample_secs: u64,
    /// Time-zone shift of each region in hours, comma-separated in region order (eu,us):
    /// `0,-8` replays the us clients' requests 8 hours earlier, as if they lived 8 time zones
    /// west of the eu ones, so each region's daily peak comes at its own hour.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    region_shift_hours: Vec<f64>,
    /// Replay only the forecaster's held-out test tail (the last 15% of the trace's time).
    #[arg(long)]
    held_out: bool,
    /// Shorten silences longer than two weeks by whole weeks (calendar features unchanged).
    #[arg(long)]
    fold_gaps: bool,
    /// Divide object sizes by this factor (scale the per-GB prices up by the same).
    #[arg(long, default_value_t = 1)]
    size_divisor: u64,
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

/// Each value of `label` among the samples of `name`, with the sum of their values: a
/// counter's outcomes.
fn by_label(metrics: &str, name: &str, label: &str) -> serde_json::Map<String, Value> {
    let prefix = format!("{name}{{");
    let mut sums: std::collections::BTreeMap<String, f64> = Default::default();
    for l in metrics.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((labels, n)) = l[prefix.len()..].rsplit_once("} ") else {
            continue;
        };
        let Ok(n) = n.trim().parse::<f64>() else {
            continue;
        };
        // Values here are plain names: no escaped quotes or commas inside them.
        let value = labels.split(',').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == label).then(|| v.trim_matches('"').to_string())
        });
        if let Some(v) = value {
            *sums.entry(v).or_default() += n;
        }
    }
    sums.into_iter().map(|(k, v)| (k, json!(v))).collect()
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

/// The origin's byte counter. An error, not 0, when it cannot be read: a run whose origin
/// bytes read as 0 would report a perfect byte hit ratio.
async fn origin_bytes(client: &reqwest::Client, origin: &str) -> anyhow::Result<u64> {
    let s = get_text(client, &format!("{origin}/_origin/stats"), None).await;
    serde_json::from_str::<Value>(&s)
        .ok()
        .and_then(|v| v["bytes"].as_u64())
        .with_context(|| {
            format!("cannot read the origin's byte counter at {origin}/_origin/stats: {s:?}")
        })
}

/// Totals of one (region, class), or of everything.
#[derive(Default, Clone, Copy)]
struct Money {
    spend: f64,
    savings: f64,
    shadows: u64,
    failed: u64,
    used: u64,
    bytes: u64,
    used_bytes: u64,
}

impl Money {
    fn add(&mut self, r: &Value) {
        self.spend += r["spend"].as_f64().unwrap_or(0.0);
        self.savings += r["savings"].as_f64().unwrap_or(0.0);
        self.shadows += r["shadows"].as_u64().unwrap_or(0);
        self.failed += r["failed"].as_u64().unwrap_or(0);
        self.used += r["used"].as_u64().unwrap_or(0);
        self.bytes += r["bytes"].as_u64().unwrap_or(0);
        self.used_bytes += r["used_bytes"].as_u64().unwrap_or(0);
    }

    fn precision(&self) -> f64 {
        if self.bytes == 0 {
            0.0
        } else {
            self.used_bytes as f64 / self.bytes as f64
        }
    }

    fn json(&self) -> Value {
        json!({
            "spend": self.spend, "savings": self.savings, "net": self.savings - self.spend,
            "shadows": self.shadows, "failed": self.failed, "used": self.used, "bytes": self.bytes,
            "used_bytes": self.used_bytes, "precision_bytes": self.precision(),
        })
    }
}

/// The cost ledger (`GET /v1/cost`) summed over providers: the total, and per (region, class)
/// with the threshold in force (tuners without settled shadows too).
fn cost_totals(cost: &Value) -> (Money, Vec<Value>) {
    let mut total = Money::default();
    let mut by: std::collections::BTreeMap<(String, String), (Money, Option<f64>)> =
        Default::default();
    let key = |v: &Value| {
        (
            v["region"].as_str().unwrap_or("-").to_string(),
            v["class"].as_str().unwrap_or("-").to_string(),
        )
    };
    for r in cost["rollups"].as_array().into_iter().flatten() {
        total.add(r);
        by.entry(key(r)).or_default().0.add(r);
    }
    for t in cost["thresholds"].as_array().into_iter().flatten() {
        by.entry(key(t)).or_default().1 = t["threshold"].as_f64();
    }
    let rows = by
        .into_iter()
        .map(|((region, class), (m, threshold))| {
            let mut v = m.json();
            v["region"] = json!(region);
            v["class"] = json!(class);
            v["threshold"] = json!(threshold.map(|t| (t * 1e4).round() / 1e4));
            v
        })
        .collect();
    (total, rows)
}

/// One timeline sample: the ledger and recall now, at `trace_secs` since the trace's start.
async fn timeline_sample(
    client: &reqwest::Client,
    cli: &Cli,
    trace_secs: f64,
    origin_before: u64,
) -> Value {
    let cost_text = get_text(
        client,
        &format!("{}/v1/cost", cli.api),
        Some(&cli.operator_token),
    )
    .await;
    let cost: Value = serde_json::from_str(&cost_text).unwrap_or(Value::Null);
    let metrics = get_text(
        client,
        &format!("{}/metrics", cli.api),
        Some(&cli.operator_token),
    )
    .await;
    // A sample the counter could not be read for says so (null) rather than 0.
    let origin = origin_bytes(client, &cli.origin)
        .await
        .ok()
        .map(|b| b.saturating_sub(origin_before));
    let (total, rows) = cost_totals(&cost);
    let mut v = total.json();
    v["trace_secs"] = json!(trace_secs.round());
    v["recall"] = json!(sample(&metrics, "shadowcdn_broker_shadow_recall", &[]));
    // 1 while the planner's model could not be loaded and seasonal naive answers instead.
    v["forecaster_fallback"] = json!(sample(
        &metrics,
        "shadowcdn_broker_forecaster_fallback",
        &[]
    ));
    v["origin_bytes"] = json!(origin);
    v["by_region_class"] = Value::Array(rows);
    // Money and precision per placing signal (forecast, co-access, anomaly, …).
    v["by_source"] = cost["by_source"].clone();
    v
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut trace = trace::load(&cli.traces_dir, &cli.trace)?;
    if cli.held_out {
        trace.held_out();
    }
    if cli.fold_gaps {
        trace.fold_gaps();
    }
    trace.scale_sizes(cli.size_divisor);
    let shifts: Vec<i64> = cli
        .region_shift_hours
        .iter()
        .map(|h| (h * 3600.0).round() as i64)
        .collect();
    trace.shift_regions(&shifts);
    // A limited run is a trace of its own: its working set (which the cache sizes are shares
    // of) and the sizes the origin serves are of the requests it replays.
    if let Some(n) = cli.limit {
        trace.requests.truncate(n);
    }
    let reqs = trace.requests.clone();
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
    let origin_before = origin_bytes(&client, &cli.origin).await?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let hist_due = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
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
    let timeline = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sampler = (cli.sample_secs > 0).then(|| {
        let (client, timeline) = (client.clone(), timeline.clone());
        let cli = cli.clone();
        let every = cli.sample_secs as f64;
        tokio::spawn(async move {
            for k in 1u64.. {
                let t = k as f64 * every;
                tokio::time::sleep_until(
                    (started + Duration::from_secs_f64(t / cli.speedup)).into(),
                )
                .await;
                let v = timeline_sample(&client, &cli, t, origin_before).await;
                timeline.lock().push(v);
            }
        })
    });
    let regions = ["eu", "us"];
    for r in &reqs {
        let due = started + Duration::from_secs_f64((r.ts - first) as f64 / cli.speedup);
        tokio::time::sleep_until(due.into()).await;
        let permit = permits.clone().acquire_owned().await?;
        let lag = Instant::now().saturating_duration_since(due);
        let url = format!("{}{}", cli.broker, r.path);
        let (client, tally, pb) = (client.clone(), tally.clone(), pb.clone());
        let (hist, hist_due) = (hist.clone(), hist_due.clone());
        let region = regions[usize::from(r.region)];
        let host = trace.host;
        let who = r.client;
        tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let resp = client
                .get(&url)
                .header("host", host)
                .header("x-client-region", region)
                .header("x-forwarded-for", who.to_string())
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
            let since_due = due.elapsed().as_micros() as u64;
            let _ = hist_due.lock().record(since_due.max(1));
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
    if let Some(s) = sampler {
        s.abort();
    }
    // The origin's bytes once every traced request has been answered (the last up to the
    // longest wait for a slot after its traced time): byte miss counts these. The total read
    // after the 3 s tail, fills the planner ordered for demand the trace no longer has
    // included, is reported as `origin_bytes_after_tail`; the last timeline sample is taken
    // after the tail too.
    let origin_at_end = origin_bytes(&client, &cli.origin).await?;
    // Let the broker's stats polls collect the shadows that ended.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let end_secs = (started.elapsed().as_secs_f64() * cli.speedup).round();
    let last = timeline_sample(&client, &cli, end_secs, origin_before).await;
    timeline.lock().push(last);
    let origin_after = origin_bytes(&client, &cli.origin).await?;
    let metrics = get_text(
        &client,
        &format!("{}/metrics", cli.api),
        Some(&cli.operator_token),
    )
    .await;
    let cost_text = get_text(
        &client,
        &format!("{}/v1/cost", cli.api),
        Some(&cli.operator_token),
    )
    .await;
    let cost: Value = serde_json::from_str(&cost_text).unwrap_or(Value::Null);
    let (money, _) = cost_totals(&cost);
    let mut fills = (0.0, 0.0);
    // How the edges' shadow marks ended: used, wasted (expired unused), evicted (the cache
    // dropped the object before the mark expired, or never stored it).
    let mut ended = [0.0; 3];
    let mut fill_bytes = 0.0;
    // Demand misses the broker hinted a peer for: served by the peer, or not held there.
    let mut peer_fills = [0.0; 3];
    for e in &cli.edges {
        let m = get_text(&client, &format!("http://{e}/metrics"), None).await;
        fills.0 += sample(&m, "shadowcdn_edge_shadow_fill_sources_total", &["origin"]);
        fills.1 += sample(&m, "shadowcdn_edge_shadow_fill_sources_total", &["peer"]);
        fill_bytes += sample(&m, "shadowcdn_edge_shadow_fill_bytes_total", &[]);
        for (i, label) in ["\"hit\"", "\"miss\"", "\"error\""].iter().enumerate() {
            peer_fills[i] += sample(&m, "shadowcdn_edge_demand_peer_fills_total", &[label]);
        }
        for (i, label) in ["\"used\"", "\"wasted\"", "\"evicted\""].iter().enumerate() {
            ended[i] += sample(&m, "shadowcdn_edge_shadows_expired_total", &[label]);
        }
    }
    let s = tally.lock();
    let h = hist.lock();
    let hd = hist_due.lock();
    let origin = origin_at_end.saturating_sub(origin_before);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let run = json!({
        "trace": cli.trace,
        "mode": cli.mode,
        "speedup": cli.speedup,
        "held_out": cli.held_out,
        "fold_gaps": cli.fold_gaps,
        "size_divisor": cli.size_divisor,
        "region_shift_hours": cli.region_shift_hours,
        "limit": cli.limit,
        "cache_bytes_per_region": cli.cache_bytes,
        "max_object_bytes": cli.max_object_bytes,
        "requests": s.requests,
        "errors": s.errors,
        "wall_secs": wall.as_secs_f64(),
        "max_lag_ms": s.max_lag.as_secs_f64() * 1000.0,
        "hit_ratio": ratio(s.hits, s.requests),
        "byte_hit_ratio": ratio(s.hit_bytes, s.bytes),
        "requested_bytes": s.bytes,
        "origin_bytes": origin,
        "origin_bytes_after_tail": origin_after.saturating_sub(origin_before),
        "byte_miss_ratio": ratio(origin, s.bytes),
        "shadow_hits": s.shadow_hits,
        "shadow_fills": { "origin": fills.0, "peer": fills.1, "bytes": fill_bytes },
        "demand_peer_fills": { "hit": peer_fills[0], "miss": peer_fills[1], "error": peer_fills[2] },
        "shadows_ended_on_edges": { "used": ended[0], "wasted": ended[1], "evicted": ended[2] },
        "shadows_settled": money.shadows,
        "shadows_failed": money.failed,
        "shadows_used": money.used,
        "precision_bytes": money.precision(),
        "recall": sample(&metrics, "shadowcdn_broker_shadow_recall", &[]),
        "forecaster_fallback": sample(&metrics, "shadowcdn_broker_forecaster_fallback", &[]),
        "cost": { "spend": money.spend, "savings": money.savings, "net": money.savings - money.spend },
        "thresholds": cost["thresholds"].clone(),
        "signal_thresholds": cost["signal_thresholds"].clone(),
        "by_source": cost["by_source"].clone(),
        // Why co-access placed or held back each follower it was offered.
        "coaccess_decisions": by_label(&metrics, "shadowcdn_broker_coaccess_shadows_total", "outcome"),
        "threshold_changes": cost["changes"].as_array().map_or(0, Vec::len),
        "latency_ms": {
            "p50": h.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": h.value_at_quantile(0.99) as f64 / 1000.0,
        },
        "latency_from_schedule_ms": {
            "p50": hd.value_at_quantile(0.5) as f64 / 1000.0,
            "p99": hd.value_at_quantile(0.99) as f64 / 1000.0,
            "max": hd.max() as f64 / 1000.0,
        },
        "sample_secs": cli.sample_secs,
        "timeline": std::mem::take(&mut *timeline.lock()),
    });
    let mut shown = run.clone();
    shown["timeline"] = json!(format!(
        "{} samples",
        run["timeline"].as_array().map_or(0, Vec::len)
    ));
    println!("{}", serde_json::to_string_pretty(&shown)?);
    if let Some(out) = &cli.out {
        let mut report: Value = std::fs::read(out)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| json!({ "runs": [] }));
        let runs = report["runs"]
            .as_array_mut()
            .context("report has no runs array")?;
        // A run replaces the earlier one of the same setup only; reports from before a field
        // was recorded read it as its default.
        const SETUP: [&str; 9] = [
            "trace",
            "mode",
            "cache_bytes_per_region",
            "speedup",
            "held_out",
            "fold_gaps",
            "size_divisor",
            "region_shift_hours",
            "limit",
        ];
        let field = |r: &Value, k: &str| match (k, &r[k]) {
            ("size_divisor", Value::Null) => json!(1),
            ("held_out" | "fold_gaps", Value::Null) => json!(false),
            ("region_shift_hours", Value::Null) => json!([]),
            (_, v) => v.clone(),
        };
        runs.retain(|r| !SETUP.iter().all(|k| field(r, k) == field(&run, k)));
        runs.push(run);
        std::fs::write(out, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("write {}", out.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counters_outcomes_are_read_by_label() {
        let m = "# TYPE shadowcdn_broker_coaccess_shadows_total counter\n\
                 shadowcdn_broker_coaccess_shadows_total{outcome=\"ok\"} 3\n\
                 shadowcdn_broker_coaccess_shadows_total{outcome=\"asked_already\"} 120\n\
                 shadowcdn_broker_coaccess_shadows_total{prev_outcome=\"x\",outcome=\"ok\"} 2\n\
                 shadowcdn_broker_coaccess_pairs 7\n";
        let got = by_label(m, "shadowcdn_broker_coaccess_shadows_total", "outcome");
        assert_eq!(got.len(), 2);
        assert_eq!(got["ok"], 5.0, "summed over the other labels");
        assert_eq!(got["asked_already"], 120.0);
    }
}
