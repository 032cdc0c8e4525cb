//! `forecast_eval`: held-out evaluation of the forecasters on the traces' test tails.
//!
//! Reads the series datasets the training script writes (`models/build/dataset-<trace>.json`,
//! made from `../shared/traces`), builds windows with the Rust feature pipeline exactly as the
//! contract in `models/README.md` says, runs the LSTM (ONNX Runtime), seasonal naive and EWMA
//! on the non-dead test windows, and prints MAE, MASE, pinball, coverage and Brier per trace —
//! also for `lstm_guarded`, the LSTM behind the per-series guard as the broker's planner serves
//! it (`models::guard`: a baseline answers a series on which it has lately been clearly
//! better). Writes a JSON report and an SVG of forecast vs actual for the busiest test series.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use models::baseline::{Ewma, SeasonalNaive};
use models::features::{History, HORIZON, WINDOW};
use models::guard::{GuardConfig, SeriesGuard};
use models::metrics::Accuracy;
use models::onnx::OnnxLstm;
use models::{Forecast, Forecaster};
use plotters::prelude::*;
use serde::Deserialize;
use serde_json::json;

/// Evaluate forecasters on the held-out tail of each trace.
#[derive(Parser, Debug)]
struct Cli {
    /// Datasets (default: models/build/dataset-*.json).
    #[arg(long)]
    dataset: Vec<PathBuf>,
    /// ONNX model (metadata next to it).
    #[arg(long, default_value = "models/lstm.onnx")]
    model: PathBuf,
    /// Where to write the JSON report and plots.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Which windows to score: `test` (the held-out tail) or `val` (the contiguous validation
    /// stretch before it, where settings such as the guard's are chosen).
    #[arg(long, default_value = "test", value_parser = ["test", "val"])]
    split: String,
    /// The guard's error-average weight (`models::guard::GuardConfig`).
    #[arg(long, default_value_t = GuardConfig::default().alpha)]
    guard_alpha: f64,
    /// Horizons scored before a baseline may answer a series.
    #[arg(long, default_value_t = GuardConfig::default().min_scored)]
    guard_min_scored: u32,
    /// A baseline answers when its error × this + the floor is below the model's.
    #[arg(long, default_value_t = GuardConfig::default().margin)]
    guard_margin: f64,
    /// Requests per horizon under which error differences never switch.
    #[arg(long, default_value_t = GuardConfig::default().floor)]
    guard_floor: f64,
}

impl Cli {
    /// Output names: the test split's plain, the validation split's with `-val`.
    fn suffix(&self) -> &'static str {
        if self.split == "val" {
            "-val"
        } else {
            ""
        }
    }

    fn guard(&self) -> GuardConfig {
        GuardConfig {
            alpha: self.guard_alpha,
            min_scored: self.guard_min_scored,
            margin: self.guard_margin,
            floor: self.guard_floor,
        }
    }
}

#[derive(Deserialize)]
struct Dataset {
    trace: String,
    bucket_secs: i64,
    first_bucket: i64,
    n_buckets: usize,
    train_end: i64,
    val_end: i64,
    series: Vec<SeriesData>,
}

impl Dataset {
    /// The scored stretch `[from, to)` of first target buckets: for validation, windows whose
    /// targets end before the test tail (as training purges them).
    fn scored(&self, split: &str) -> (i64, i64) {
        match split {
            "val" => (
                self.train_end,
                self.val_end - (HORIZON as i64 - 1) * self.bucket_secs,
            ),
            _ => (self.val_end, i64::MAX),
        }
    }

    /// Index of the first bucket starting at or after `t`.
    fn bucket_at(&self, t: i64) -> usize {
        let d = t.saturating_sub(self.first_bucket).max(0);
        usize::try_from(d.div_euclid(self.bucket_secs) + i64::from(d % self.bucket_secs != 0))
            .unwrap_or(usize::MAX)
    }
}

#[derive(Deserialize)]
struct SeriesData {
    resource: String,
    region: u32,
    priority: u8,
    counts: Vec<u32>,
}

/// Buckets of history a forecaster sees: 7 days.
fn max_history(bucket_secs: i64) -> usize {
    (7 * 86_400 / bucket_secs) as usize
}

struct Window {
    series: usize,
    end: usize, // history is counts[..end], target counts[end..end + HORIZON]
    y: f64,
}

fn windows(ds: &Dataset, (from, to): (i64, i64)) -> Vec<Window> {
    let mut out = Vec::new();
    for (si, s) in ds.series.iter().enumerate() {
        for end in WINDOW..=s.counts.len().saturating_sub(HORIZON) {
            let first_target = ds.first_bucket + end as i64 * ds.bucket_secs;
            if first_target < from || first_target >= to {
                continue;
            }
            let target = &s.counts[end..end + HORIZON];
            let dead = target.iter().all(|c| *c == 0)
                && s.counts[end - WINDOW..end].iter().all(|c| *c == 0);
            if dead {
                continue;
            }
            out.push(Window {
                series: si,
                end,
                y: target.iter().map(|c| f64::from(*c)).sum(),
            });
        }
    }
    out
}

fn history<'a>(ds: &'a Dataset, w: &Window) -> History<'a> {
    let s = &ds.series[w.series];
    let start = w.end.saturating_sub(max_history(ds.bucket_secs));
    History {
        counts: &s.counts[start..w.end],
        last_bucket_start: ds.first_bucket + (w.end as i64 - 1) * ds.bucket_secs,
        bucket_secs: ds.bucket_secs,
        priority: s.priority,
    }
}

/// The forecasts of the scored windows as the planner serves them with its guard on: from the
/// first scored bucket on, every series whose last 7 days hold a request is forecast by all
/// three forecasters (model first) at every bucket, in time order, and the guard — which sees
/// only horizons already past — picks who answers. The guard starts empty at the scored
/// stretch, so nothing before it is used. Windows the planner would not forecast keep the
/// model's answer.
fn guarded(
    forecasters: &[Box<dyn Forecaster>],
    ds: &Dataset,
    ws: &[Window],
    model: &[Forecast],
    (from, to): (i64, i64),
    cfg: GuardConfig,
) -> anyhow::Result<Vec<Forecast>> {
    let last = ds.n_buckets.saturating_sub(HORIZON).min(ds.bucket_at(to));
    let mut steps = Vec::new();
    for end in ds.bucket_at(from).max(WINDOW)..=last {
        for (si, s) in ds.series.iter().enumerate() {
            let from = end.saturating_sub(max_history(ds.bucket_secs));
            if s.counts[from..end].iter().any(|c| *c > 0) {
                steps.push(Window {
                    series: si,
                    end,
                    y: 0.0,
                });
            }
        }
    }
    let all: Vec<Vec<Forecast>> = forecasters
        .iter()
        .map(|f| run(f.as_ref(), ds, &steps))
        .collect::<anyhow::Result<_>>()?;
    let mut guard = SeriesGuard::new(all.len(), cfg);
    let mut chosen = std::collections::HashMap::new();
    let mut bucket = None;
    for (i, w) in steps.iter().enumerate() {
        if bucket.is_some_and(|b| b != w.end) {
            guard.end_tick();
        }
        bucket = Some(w.end);
        let p50s: Vec<f32> = all.iter().map(|p| p[i].p50()).collect();
        let k = guard.choose(w.series as u64, &history(ds, w), &p50s);
        chosen.insert((w.series, w.end), all[k][i]);
    }
    Ok(ws
        .iter()
        .zip(model)
        .map(|(w, m)| chosen.get(&(w.series, w.end)).copied().unwrap_or(*m))
        .collect())
}

fn run(f: &dyn Forecaster, ds: &Dataset, ws: &[Window]) -> anyhow::Result<Vec<Forecast>> {
    let mut out = Vec::with_capacity(ws.len());
    for chunk in ws.chunks(4096) {
        let hs: Vec<History<'_>> = chunk.iter().map(|w| history(ds, w)).collect();
        out.extend(f.forecast(&hs)?);
    }
    Ok(out)
}

fn plot(
    path: &PathBuf,
    ds: &Dataset,
    ws: &[Window],
    preds: &[(String, Vec<Forecast>)],
) -> anyhow::Result<()> {
    // The busiest series in the test tail, its windows in time order (the first 200).
    let mut load = vec![0f64; ds.series.len()];
    for w in ws {
        load[w.series] += w.y;
    }
    let busiest = (0..load.len())
        .max_by(|a, b| load[*a].total_cmp(&load[*b]))
        .unwrap_or(0);
    let idx: Vec<usize> = (0..ws.len())
        .filter(|i| ws[*i].series == busiest)
        .take(200)
        .collect();
    if idx.is_empty() {
        return Ok(());
    }
    let ymax = idx
        .iter()
        .map(|i| {
            preds
                .iter()
                .map(|(_, p)| f64::from(p[*i].quantiles[2]))
                .fold(ws[*i].y, f64::max)
        })
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} — {} (region {}): next-hour requests, test tail",
        ds.trace, ds.series[busiest].resource, ds.series[busiest].region
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0..idx.len(), 0f64..ymax * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("test window")
        .y_desc("requests in horizon")
        .draw()?;
    if let Some((_, lstm)) = preds.iter().find(|(n, _)| n == "lstm") {
        chart.draw_series(AreaSeries::new(
            idx.iter()
                .enumerate()
                .map(|(x, i)| (x, f64::from(lstm[*i].quantiles[2]))),
            0.0,
            BLUE.mix(0.15),
        ))?;
    }
    chart
        .draw_series(LineSeries::new(
            idx.iter().enumerate().map(|(x, i)| (x, ws[*i].y)),
            BLACK.stroke_width(2),
        ))?
        .label("actual")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for ((name, p), color) in preds.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                idx.iter()
                    .enumerate()
                    .map(|(x, i)| (x, f64::from(p[*i].p50()))),
                color,
            ))?
            .label(format!("{name} p50"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut paths = cli.dataset.clone();
    if paths.is_empty() {
        for t in ["apache", "nasa"] {
            paths.push(PathBuf::from(format!("models/build/dataset-{t}.json")));
        }
    }
    let lstm = OnnxLstm::load(&cli.model, 1).context("loading the LSTM")?;
    let forecasters: Vec<Box<dyn Forecaster>> = vec![
        Box::new(lstm),
        Box::new(SeasonalNaive),
        Box::new(Ewma::default()),
    ];
    std::fs::create_dir_all(&cli.out)?;
    let mut report = serde_json::Map::new();
    for path in &paths {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "{} (run `bash models/train/train.sh` to build it)",
                path.display()
            )
        })?;
        let ds: Dataset =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if ds.series.iter().any(|s| s.counts.len() != ds.n_buckets) {
            bail!("{}: series lengths differ from n_buckets", path.display());
        }
        let scored = ds.scored(&cli.split);
        let ws = windows(&ds, scored);
        let mut preds = Vec::new();
        for f in &forecasters {
            preds.push((f.name().to_string(), run(f.as_ref(), &ds, &ws)?));
        }
        let guarded = guarded(&forecasters, &ds, &ws, &preds[0].1, scored, cli.guard())?;
        preds.push(("lstm_guarded".to_string(), guarded));
        let acc: Vec<(String, Accuracy)> = preds
            .iter()
            .map(|(n, p)| {
                let mut a = Accuracy::default();
                for (f, w) in p.iter().zip(&ws) {
                    a.add(f, w.y);
                }
                (n.clone(), a)
            })
            .collect();
        let naive_mae = acc
            .iter()
            .find(|(n, _)| n == "seasonal_naive")
            .map_or(1.0, |(_, a)| a.mae());
        println!(
            "\n## {} — {} {} windows (non-dead), {} series",
            ds.trace,
            cli.split,
            ws.len(),
            ds.series.len()
        );
        println!("| model | MAE | MASE | pinball q10 | pinball q50 | pinball q90 | coverage p10–p90 | Brier |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut trace_report = serde_json::Map::new();
        for (name, a) in &acc {
            let p = a.pinball();
            let mase = if naive_mae > 0.0 {
                a.mae() / naive_mae
            } else {
                f64::NAN
            };
            println!(
                "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1}% | {:.4} |",
                a.mae(),
                mase,
                p[0],
                p[1],
                p[2],
                100.0 * a.coverage(),
                a.brier()
            );
            trace_report.insert(
                name.clone(),
                json!({"mae": a.mae(), "mase": mase, "pinball": {"q10": p[0], "q50": p[1], "q90": p[2]},
                       "coverage": a.coverage(), "brier": a.brier(), "windows": a.count()}),
            );
        }
        report.insert(ds.trace.clone(), serde_json::Value::Object(trace_report));
        let svg = cli
            .out
            .join(format!("forecast-{}{}.svg", ds.trace, cli.suffix()));
        plot(&svg, &ds, &ws, &preds)?;
        println!("plot: {}", svg.display());
    }
    let out = cli.out.join(format!("forecast-eval{}.json", cli.suffix()));
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("\nreport: {}", out.display());
    Ok(())
}
