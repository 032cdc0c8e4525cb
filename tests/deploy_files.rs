//! The operator-facing files under deploy/ stay in step with the code: every metric the
//! Grafana dashboard and the Prometheus alerts query is one the edge or the broker exports,
//! so renaming a metric cannot leave a panel blank or an alert silently unable to fire; every
//! configuration shipped there passes its binary's `--check`; the Kubernetes broker addresses
//! the edges by their pods' DNS names; the image carries the ONNX Runtime version the
//! forecaster expects.

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
    // The job names the `up` rules ask for are the local scrape's jobs, and on Kubernetes the
    // app labels the manifests give their pods (kubernetes.yml copies app into job).
    let k8s = read("deploy/prometheus/kubernetes.yml");
    assert!(k8s.contains("- alerts.yml") && k8s.contains("target_label: job"));
    for job in rules
        .split("up{job=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
    {
        assert!(
            config.contains(&format!("job_name: {job}")),
            "prometheus.yml has no {job}"
        );
        let manifests =
            read("deploy/kubernetes/edge-node.yaml") + &read("deploy/kubernetes/broker.yaml");
        assert!(
            manifests.contains(&format!("labels: {{ app: {job} }}")),
            "no Kubernetes pod is labelled app: {job}"
        );
        assert!(k8s.contains(job), "kubernetes.yml does not keep {job}");
    }
}

/// The block of a Kubernetes ConfigMap key written as `  <key>: |`, unindented.
fn config_map_entry(yaml: &str, key: &str) -> String {
    let header = format!("  {key}: |");
    let mut lines = yaml.lines().skip_while(|l| l.trim_end() != header);
    assert!(lines.next().is_some(), "no ConfigMap entry {key}");
    let mut out = String::new();
    for l in lines {
        if !l.trim().is_empty() && !l.starts_with("    ") {
            break;
        }
        out.push_str(l.strip_prefix("    ").unwrap_or(""));
        out.push('\n');
    }
    out
}

/// Runs `bin --check` on the TOML text `toml` with `envs` (the variables a deployment sets) and
/// no other SHADOWCDN_* variable, and fails with the binary's message.
fn assert_check_passes(
    package: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    name: &str,
    toml: &str,
) {
    let out = check(package, args, envs, name, toml);
    assert!(
        out.status.success(),
        "{package} --check rejects {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `package --check` says of `toml` (written as `name`), with only `envs` of the
/// `SHADOWCDN_` variables set.
fn check(
    package: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    name: &str,
    toml: &str,
) -> std::process::Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, toml).expect("write config");
    let bin = shadowcdn_tests::Binary::get(package);
    let mut cmd = bin.command();
    cmd.args(args).arg("--config").arg(&path).arg("--check");
    for (k, _) in std::env::vars() {
        if k.starts_with("SHADOWCDN_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().copied());
    cmd.output().expect("run --check")
}

#[test]
fn every_shipped_configuration_passes_its_binarys_check() {
    let local_edge = read("deploy/local/edge.toml");
    assert_check_passes("edge-node", &[], &[], "local-edge.toml", &local_edge);
    let local_broker = read("deploy/local/broker.toml");
    assert_check_passes("broker", &["run"], &[], "local-broker.toml", &local_broker);
    // The Kubernetes configs take their tokens and per-pod certificate paths from the
    // environment (Secrets), as the manifests set them.
    // All digits, from the environment: a string setting all the same, taken as written.
    let token = "03141592653589793238";
    let edge = config_map_entry(&read("deploy/kubernetes/edge-node.yaml"), "edge.toml");
    let edge_env = [
        ("SHADOWCDN_EDGE_NODE_ID", "shadowcdn-edge-0"),
        ("SHADOWCDN_EDGE_ADMIN__TOKEN", token),
        (
            "SHADOWCDN_EDGE_SYNC__CERT",
            "/etc/shadowcdn/tls/shadowcdn-edge-0.pem",
        ),
        (
            "SHADOWCDN_EDGE_SYNC__KEY",
            "/etc/shadowcdn/tls/shadowcdn-edge-0.key",
        ),
    ];
    assert_check_passes("edge-node", &[], &edge_env, "k8s-edge.toml", &edge);
    let broker = config_map_entry(&read("deploy/kubernetes/broker.yaml"), "broker.toml");
    let broker_env = [
        ("SHADOWCDN_BROKER_ADMIN__OPERATOR_TOKEN", token),
        ("SHADOWCDN_BROKER_ADMIN__EDGE_TOKEN", token),
    ];
    assert_check_passes("broker", &["run"], &broker_env, "k8s-broker.toml", &broker);
    // A pod whose Secret lacks the token does not start on the manifest's placeholder.
    let without_token = [edge_env[0], edge_env[2], edge_env[3]];
    let out = check("edge-node", &[], &without_token, "k8s-edge.toml", &edge);
    let said = String::from_utf8_lossy(&out.stderr);
    let placeholder = "admin.token is the shipped placeholder";
    assert!(
        !out.status.success() && said.contains(placeholder),
        "{said}"
    );
    let out = check(
        "broker",
        &["run"],
        &broker_env[..1],
        "k8s-broker.toml",
        &broker,
    );
    let said = String::from_utf8_lossy(&out.stderr);
    let placeholder = "edge_token is the shipped placeholder";
    assert!(
        !out.status.success() && said.contains(placeholder),
        "{said}"
    );
}

/// `(field, value)` of every `field = "value"` line of a TOML text, in order.
fn toml_strings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = v
                .split('#')
                .next()?
                .trim()
                .strip_prefix('"')?
                .strip_suffix('"')?;
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// Kubernetes adds `<SERVICE>_SERVICE_HOST`-style variables to pods unless told not to; for a
/// Service named `shadowcdn-broker` they would read as unknown config keys and stop the broker.
#[test]
fn kubernetes_pods_take_no_service_link_variables() {
    for file in [
        "deploy/kubernetes/broker.yaml",
        "deploy/kubernetes/edge-node.yaml",
    ] {
        let yaml = read(file);
        let pods = yaml.matches("containers:").count();
        let off = yaml.matches("enableServiceLinks: false").count();
        assert!(
            pods > 0 && off == pods,
            "{file}: {off} of {pods} pod specs turn service links off"
        );
    }
}

#[test]
fn the_kubernetes_broker_addresses_each_edge_by_its_pod_name() {
    let edges = read("deploy/kubernetes/edge-node.yaml");
    let broker = config_map_entry(&read("deploy/kubernetes/broker.yaml"), "broker.toml");
    let fields = toml_strings(&broker);
    let ids: Vec<&str> = fields
        .iter()
        .filter(|(k, _)| k == "id")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(!ids.is_empty(), "broker.yaml lists no edges");
    let docs: Vec<&str> = edges.split("\n---\n").collect();
    let set = docs
        .iter()
        .find(|d| d.contains("kind: StatefulSet"))
        .expect("edge-node.yaml has a StatefulSet");
    let value = |doc: &str, key: &str| {
        doc.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key} in {doc}"))
    };
    let (set_name, governing) = (value(set, "name:"), value(set, "serviceName:"));
    assert_eq!(
        value(set, "replicas:").parse::<usize>().unwrap(),
        ids.len(),
        "the broker lists every replica"
    );
    let service = docs
        .iter()
        .find(|d| d.contains("kind: Service") && value(d, "name:") == governing)
        .unwrap_or_else(|| panic!("edge-node.yaml has no Service {governing}"));
    // Pod DNS names exist only under a headless Service; not-ready pods must be published
    // for the broker to probe a starting edge.
    assert_eq!(value(service, "clusterIP:"), "None");
    assert_eq!(value(service, "publishNotReadyAddresses:"), "true");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(*id, format!("{set_name}-{n}"), "edge {n} is pod {n}");
        let edge_fields: Vec<&(String, String)> = fields
            .iter()
            .skip_while(|(k, v)| !(k == "id" && v == id))
            .take_while(|(k, v)| !(k == "id" && v != id))
            .collect();
        for (field, port) in [("addr", "8080"), ("admin", "9080"), ("sync", "8443")] {
            let want = format!("{id}.{governing}:{port}");
            assert!(
                edge_fields.iter().any(|(k, v)| k == field && *v == want),
                "edge {n} ({id}): {field} should be {want}"
            );
            assert!(
                set.contains(&format!("containerPort: {port}")),
                "the edge pods do not listen on {port}"
            );
        }
    }
    for (section, listen) in [
        ("[server]", "0.0.0.0:8080"),
        ("[admin]", "0.0.0.0:9080"),
        ("[sync]", "0.0.0.0:8443"),
    ] {
        let edge = config_map_entry(&edges, "edge.toml");
        let after = edge.split(section).nth(1).expect("section present");
        assert!(
            after.lines().take(3).any(|l| l.contains(listen)),
            "edge.toml {section} does not listen on {listen}"
        );
    }
}

#[test]
fn the_image_ships_the_onnx_runtime_the_setup_pins() {
    let setup = read("deploy/setup.sh");
    let version = setup
        .lines()
        .find_map(|l| l.strip_prefix("ORT_VERSION="))
        .expect("setup.sh pins ORT_VERSION");
    let docker = read("deploy/docker/Dockerfile");
    assert!(
        docker.contains(&format!("libonnxruntime.so.{version}")),
        "the Dockerfile's ORT_DYLIB_PATH is not onnxruntime {version}"
    );
    for bin in ["edge-node", "broker"] {
        assert!(
            docker.contains(&format!("target/release/{bin}")),
            "the image lacks {bin}"
        );
    }
    // A broker installed by its systemd unit loads the same runtime (without it the planner
    // runs on the baseline for good).
    let unit = read("deploy/systemd/shadowcdn-broker.service");
    let ort = |text: &str| {
        text.split(|c: char| c.is_whitespace() || c == '\\')
            .find_map(|w| w.strip_prefix("ORT_DYLIB_PATH="))
            .map(str::to_string)
    };
    let in_unit = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .find_map(ort);
    assert_eq!(
        in_unit,
        ort(&docker),
        "the broker unit's ORT_DYLIB_PATH differs from the image's"
    );
    for file in ["models/lstm.onnx", "models/lstm.json"] {
        assert!(
            repo().join(file).is_file() && docker.contains(file),
            "{file}"
        );
    }
    for manifest in ["edge-node.yaml", "broker.yaml"] {
        assert!(
            read(&format!("deploy/kubernetes/{manifest}")).contains("image: shadowcdn/shadowcdn:"),
            "{manifest} does not run the image deploy/docker/Dockerfile builds"
        );
    }
}

/// The first number on the line of `text` that starts (after indentation) with `field`.
fn number_after(text: &str, field: &str) -> u64 {
    text.lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim_start_matches([' ', '=', ':'])
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no number after {field}"))
}

/// A service manager that kills a stopping process before its graceful stop can end would
/// cut off what the stop exists for (the broker's request-series snapshot, the edge's cache
/// flush): each stop timeout covers the drain, the final step's allowance and the runtimes'
/// shutdown (the edge's pingora runtimes, 10 s by default, then its storage runtime, 5 s; the
/// broker's 5 s after its 5 s preStop).
#[test]
fn stop_timeouts_cover_a_whole_graceful_stop() {
    let longest = |drain: u64| drain + edge_node::drain::FINISH_ALLOWANCE_SECS + 15;
    for (file, key) in [
        ("deploy/kubernetes/edge-node.yaml", "edge.toml"),
        ("deploy/kubernetes/broker.yaml", "broker.toml"),
    ] {
        let yaml = read(file);
        let drain = number_after(&config_map_entry(&yaml, key), "drain_timeout_secs");
        let grace = number_after(&yaml, "terminationGracePeriodSeconds");
        assert!(
            grace >= longest(drain),
            "{file}: {grace} s < {}",
            longest(drain)
        );
    }
    // The units run the shipped defaults: a 30 s drain.
    for unit in [
        "deploy/systemd/shadowcdn-edge.service",
        "deploy/systemd/shadowcdn-broker.service",
    ] {
        let stop = number_after(&read(unit), "TimeoutStopSec");
        assert!(stop >= longest(30), "{unit}: {stop} s < {}", longest(30));
    }
}
