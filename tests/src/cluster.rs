//! Start edges and brokers as real processes with configs written to a temp dir.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::process::{free_port, Binary, Child};

/// Admin token every test edge uses.
pub const EDGE_TOKEN: &str = "test-admin-token";
/// Operator token of test brokers.
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789";

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("loopback address")
}

/// A node's PEM files.
#[derive(Debug, Clone)]
pub struct NodeCerts {
    /// Cluster CA certificate.
    pub ca_cert: PathBuf,
    /// The node's certificate.
    pub cert: PathBuf,
    /// The node's key.
    pub key: PathBuf,
    /// The CA's revocation list.
    pub crl: PathBuf,
}

/// A cluster CA with a revocation list (empty until something is revoked), made and used
/// through the real `edge-node certs` CLI.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Create a CA and its (empty) revocation list in `dir`.
    pub fn create(dir: &Path) -> Pki {
        let d = dir.to_str().expect("utf-8 path");
        Self::certs(&["ca", "--dir", d]);
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// Run `edge-node certs <args>`, which must succeed.
    fn certs(args: &[&str]) {
        let out = Binary::get("edge-node")
            .command()
            .arg("certs")
            .args(args)
            .output()
            .expect("run edge-node certs");
        assert!(
            out.status.success(),
            "certs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Add the certificates of `nodes` to the CA's revocation list, in one new list.
    pub fn revoke(&self, nodes: &[&NodeCerts]) {
        let dir = self.dir.to_str().expect("utf-8 path");
        let mut args = vec!["revoke", "--ca-dir", dir];
        args.extend(nodes.iter().map(|n| n.cert.to_str().expect("utf-8 path")));
        Self::certs(&args);
    }

    /// Issue a certificate for edge `name` (or the broker).
    pub fn issue(&self, name: &str, broker: bool) -> NodeCerts {
        let dir = self.dir.to_str().expect("utf-8 path");
        let mut args = vec!["issue", "--ca-dir", dir, "--name", name];
        if broker {
            args.push("--broker");
        }
        Self::certs(&args);
        NodeCerts {
            ca_cert: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            crl: self.dir.join("ca.crl"),
        }
    }
}

fn pem_section(header: &str, c: &NodeCerts) -> String {
    format!(
        "\n[{header}]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncrl = \"{}\"\n",
        c.ca_cert.display(),
        c.cert.display(),
        c.key.display(),
        c.crl.display()
    )
}

/// A running edge.
pub struct EdgeProc {
    /// The process.
    pub child: Child,
    /// HTTP address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Its working directory (config and cache).
    pub dir: PathBuf,
    /// QUIC address, when the edge speaks QUIC.
    pub sync: Option<SocketAddr>,
    certs: Option<NodeCerts>,
    node_id: String,
    /// Origins in its config file (the broker pushes more at run time).
    pub origins: Vec<(String, SocketAddr)>,
    cache_extra: String,
    /// Extra environment (`SHADOWCDN_EDGE_*` overrides) for every start.
    envs: Vec<(String, String)>,
}

/// The TOML of a test edge.
pub fn edge_config(
    node_id: &str,
    cache_dir: &Path,
    addr: SocketAddr,
    admin: SocketAddr,
    origins: &[(String, SocketAddr)],
    cache_extra: &str,
) -> String {
    let mut s = format!(
        r#"
node_id = "{node_id}"
[server]
listen = "{addr}"
threads = 2
drain_timeout_secs = 20
shutdown_timeout_secs = 10
origin_connect_timeout_secs = 1
origin_read_timeout_secs = 5

[admin]
listen = "{admin}"
token = "{EDGE_TOKEN}"

[cache]
dir = "{dir}"
memory_capacity = "16 MiB"
disk_capacity = "64 MiB"
max_object_size = "1 MiB"
lock_timeout_secs = 5
{cache_extra}
"#,
        dir = cache_dir.display()
    );
    for (host, up) in origins {
        s.push_str(&format!(
            "\n[[origins]]\nhost = \"{host}\"\nupstream = \"http://{up}\"\n"
        ));
    }
    s
}

impl EdgeProc {
    /// Start an edge on fresh ports with its state under `dir`.
    pub fn start(
        dir: &Path,
        node_id: &str,
        origins: &[(String, SocketAddr)],
        cache_extra: &str,
    ) -> EdgeProc {
        Self::start_with_certs(dir, node_id, origins, cache_extra, None)
    }

    /// Start an edge that also listens for QUIC with `certs`.
    pub fn start_with_certs(
        dir: &Path,
        node_id: &str,
        origins: &[(String, SocketAddr)],
        cache_extra: &str,
        certs: Option<NodeCerts>,
    ) -> EdgeProc {
        let mut e = Self::unstarted(dir, node_id, origins, cache_extra, certs);
        e.spawn();
        e
    }

    /// Start an edge on fresh ports whose configuration file is overridden by `envs`.
    pub fn start_with_env(
        dir: &Path,
        node_id: &str,
        origins: &[(String, SocketAddr)],
        envs: &[(&str, &str)],
    ) -> EdgeProc {
        let mut e = Self::unstarted(dir, node_id, origins, "", None);
        e.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        e.spawn();
        e
    }

    fn unstarted(
        dir: &Path,
        node_id: &str,
        origins: &[(String, SocketAddr)],
        cache_extra: &str,
        certs: Option<NodeCerts>,
    ) -> EdgeProc {
        EdgeProc {
            child: Child::placeholder(),
            addr: loopback(),
            admin: loopback(),
            sync: certs.as_ref().map(|_| loopback()),
            certs,
            dir: dir.to_path_buf(),
            node_id: node_id.to_string(),
            origins: origins.to_vec(),
            cache_extra: cache_extra.to_string(),
            envs: Vec::new(),
        }
    }

    /// Override `key` of the configuration file with `value` from the next start on (a
    /// `SHADOWCDN_EDGE_*` variable).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.retain(|(k, _)| k != key);
        self.envs.push((key.to_string(), value.to_string()));
    }

    /// (Re)start the process at the same addresses and cache directory.
    pub fn spawn(&mut self) {
        self.spawn_starting();
        self.child.wait_listening(self.addr);
        self.child.wait_listening(self.admin);
    }

    /// (Re)start the process, not waiting for it to listen.
    pub fn spawn_starting(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("edge dir");
        let cfg = self.dir.join("edge.toml");
        let mut extra = self.cache_extra.clone();
        if let (Some(addr), Some(c)) = (self.sync, &self.certs) {
            extra.push_str(&pem_section("sync", c));
            extra.push_str(&format!("listen = \"{addr}\"\n"));
        }
        std::fs::write(
            &cfg,
            edge_config(
                &self.node_id,
                &self.dir.join("cache"),
                self.addr,
                self.admin,
                &self.origins,
                &extra,
            ),
        )
        .expect("write edge config");
        let bin = Binary::get("edge-node");
        let mut envs = vec![("RUST_LOG", "warn")];
        envs.extend(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.child = bin.spawn(&["--config", cfg.to_str().expect("utf-8 path")], &envs);
    }
}

/// One edge as the broker's config lists it.
pub struct EdgeSpec<'a> {
    /// Edge id.
    pub id: &'a str,
    /// Region.
    pub region: &'a str,
    /// `active` or `standby`.
    pub role: &'a str,
    /// The running edge.
    pub edge: &'a EdgeProc,
}

/// A running broker.
pub struct BrokerProc {
    /// The process.
    pub child: Child,
    /// User-facing address.
    pub addr: SocketAddr,
    /// Provider API address.
    pub admin: SocketAddr,
    /// Unauthenticated metrics listener (`admin.metrics_listen`).
    pub metrics: SocketAddr,
    config: PathBuf,
}

impl BrokerProc {
    /// The config file it runs with (its `data_dir` is `data` beside it).
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Start a broker over `edges` with regions `eu` and `us` (neighbours of each other);
    /// `extra` is added to its config (a line `admin.<key> = …` sets a key of `[admin]`, one
    /// `client_region.<key> = …` a key of `[client_region]`).
    pub fn start(dir: &Path, edges: &[EdgeSpec<'_>], extra: &str) -> BrokerProc {
        Self::start_with_certs(dir, edges, extra, None)
    }

    /// Start a broker that reaches QUIC edges with `certs`.
    pub fn start_with_certs(
        dir: &Path,
        edges: &[EdgeSpec<'_>],
        extra: &str,
        certs: Option<&NodeCerts>,
    ) -> BrokerProc {
        Self::start_listing(dir, edges, extra, certs, &|a: SocketAddr| a.to_string())
    }

    /// [`Self::start_with_certs`], the broker's config naming each edge address by
    /// `name_of(address)` (a DNS name instead of the IP, say).
    pub fn start_listing(
        dir: &Path,
        edges: &[EdgeSpec<'_>],
        extra: &str,
        certs: Option<&NodeCerts>,
        name_of: &dyn Fn(SocketAddr) -> String,
    ) -> BrokerProc {
        let addr = loopback();
        let admin = loopback();
        let metrics = loopback();
        // `[admin]` and `[client_region]` are written here: lines of `extra` that start with
        // `admin.` or `client_region.` set their keys.
        let keys_of = |table: &str| -> String {
            extra
                .lines()
                .filter_map(|l| l.strip_prefix(table))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let (admin_extra, region_extra) = (keys_of("admin."), keys_of("client_region."));
        let extra: Vec<&str> = extra
            .lines()
            .filter(|l| !l.starts_with("admin.") && !l.starts_with("client_region."))
            .collect();
        let extra = extra.join("\n");
        let mut s = format!(
            r#"
listen = "{addr}"
threads = 2
drain_timeout_secs = 10
data_dir = "{data}"
segment_header = "x-user-segment"
{extra}

[admin]
listen = "{admin}"
metrics_listen = "{metrics}"
operator_token = "{OPERATOR_TOKEN}"
edge_token = "{EDGE_TOKEN}"
max_body_bytes = 4096
allow_private_upstreams = true
allow_local_hosts = true
{admin_extra}
[client_region]
trust_header = true
default = "eu"
{region_extra}
[health]
interval_ms = 100
timeout_ms = 1000
fall = 2
rise = 2

[monitor]
bucket_secs = 60
snapshot_secs = 1

[[regions]]
name = "eu"
neighbours = ["us"]

[[regions]]
name = "us"
neighbours = ["eu"]
"#,
            data = dir.join("data").display()
        );
        for e in edges {
            s.push_str(&format!(
                "\n[[edges]]\nid = \"{}\"\nregion = \"{}\"\nrole = \"{}\"\naddr = \"{}\"\nadmin = \"{}\"\n",
                e.id,
                e.region,
                e.role,
                name_of(e.edge.addr),
                name_of(e.edge.admin)
            ));
            if let Some(sync) = e.edge.sync {
                s.push_str(&format!("sync = \"{}\"\n", name_of(sync)));
            }
        }
        if let Some(c) = certs {
            s.push_str(&pem_section("control", c));
            s.push_str("stats_interval_secs = 1\n");
        }
        let config = dir.join("broker.toml");
        std::fs::write(&config, s).expect("write broker config");
        let mut b = BrokerProc {
            child: Child::placeholder(),
            addr,
            admin,
            metrics,
            config,
        };
        b.spawn();
        b
    }

    /// (Re)start the process with the same config and data.
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// (Re)start the process with the same config and data, and `env` set (configuration
    /// overrides, `SHADOWCDN_BROKER_…`).
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        self.spawn_starting(env);
        self.child.wait_listening(self.addr);
        self.child.wait_listening(self.admin);
        self.child.wait_listening(self.metrics);
    }

    /// (Re)start the process with `env` set, not waiting for it to listen.
    pub fn spawn_starting(&mut self, env: &[(&str, &str)]) {
        let bin = Binary::get("broker");
        let mut vars = vec![("RUST_LOG", "warn")];
        vars.extend_from_slice(env);
        self.child = bin.spawn(
            &["run", "--config", self.config.to_str().expect("utf-8 path")],
            &vars,
        );
    }

    /// Full URL of a provider API path.
    pub fn api(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// URL of the broker's Prometheus metrics (the unauthenticated metrics listener).
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics)
    }
}
