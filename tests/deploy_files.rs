//! The operator-facing files under deploy/ stay in step with the code: every metric the
//! Grafana dashboard and the Prometheus alerts query is one the edge or the broker exports,
//! so renaming a metric cannot leave a panel blank or an alert silently unable to fire.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `.rs` file under `dir`, concatenated.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).expect("readable source"));
        }
    }
}

/// The `shadowcdn_edge_*` / `shadowcdn_broker_*` names a text mentions.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("shadowcdn_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if name.starts_with("shadowcdn_edge_") || name.starts_with("shadowcdn_broker_") {
            names.push(name.to_string());
        }
        rest = &tail[end..];
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn dashboards_and_alerts_query_only_exported_metrics() {
    let mut code = String::new();
    for dir in ["edge-node/src", "broker/src"] {
        sources(&repo().join(dir), &mut code);
    }
    let exported = |name: &str| code.contains(&format!("\"{name}\""));
    for file in [
        "deploy/grafana/shadowcdn.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let names = metric_names(&read(file));
        assert!(names.len() >= 5, "{file} names only {names:?}");
        for name in names {
            // Histograms are exported under their base name.
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| exported(b))
                .unwrap_or(&name);
            assert!(
                exported(base),
                "{file} queries {name}, which nothing exports"
            );
        }
    }
}

#[test]
fn every_alert_has_an_expression_and_prometheus_loads_the_rules() {
    let rules = read("deploy/prometheus/alerts.yml");
    let alerts: Vec<&str> = rules.split("- alert:").skip(1).collect();
    assert!(alerts.len() >= 10, "{} alerts", alerts.len());
    for a in &alerts {
        let name = a.lines().next().unwrap_or_default().trim();
        assert!(name.starts_with("Shadowcdn"), "alert name {name:?}");
        for field in ["expr:", "severity:", "summary:"] {
            assert!(a.contains(field), "alert {name} has no {field}");
        }
    }
    let config = read("deploy/prometheus/prometheus.yml");
    assert!(config.contains("rule_files:") && config.contains("- alerts.yml"));
}
