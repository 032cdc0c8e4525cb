//! `broker`: run the shadowcdn broker, or talk to its provider API.

use std::path::PathBuf;
use std::process::ExitCode;

use broker::{Broker, BrokerConfig};
use clap::{Parser, Subcommand};
use edge_node::stop_signals::StopSignals;
use serde_json::{json, Value};

/// mimalloc, as on the edge: the proxy path allocates per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The shadowcdn broker and its provider CLI.
#[derive(Parser, Debug)]
#[command(name = "broker", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the broker.
    Run {
        /// TOML configuration (overridden by SHADOWCDN_BROKER_* variables).
        #[arg(short, long, env = "SHADOWCDN_BROKER_CONFIG")]
        config: Option<PathBuf>,
        /// Validate the configuration's values and exit (0, or 2 naming the bad field);
        /// touches no file but the config.
        #[arg(long)]
        check: bool,
        /// As `--check`, and also prove `data_dir` writable (creating it if missing), the access
        /// log openable, the HTTPS and QUIC certificates loadable and the saved state readable
        /// (revocation list number, pending purges, edge certificates): what a start opens
        /// besides its ports and the registry, writing no saved state.
        #[arg(long)]
        preflight: bool,
    },
    /// Provider API client (see broker/openapi.yaml).
    #[command(flatten_help = true)]
    Api {
        /// Base URL of the broker's admin listener.
        #[arg(long, env = "SHADOWCDN_API", default_value = "http://127.0.0.1:7081")]
        api: String,
        /// Bearer token (operator or provider); `--help` does not show the variable's value.
        #[arg(long, env = "SHADOWCDN_TOKEN", hide_env_values = true)]
        token: String,
        #[command(subcommand)]
        call: Call,
    },
}

#[derive(Subcommand, Debug)]
enum Call {
    /// Create a provider (operator token); prints its token once.
    CreateProvider {
        /// Display name.
        name: String,
    },
    /// Replace a provider's token (operator token); prints the new one once, and the old
    /// one stops working.
    RotateToken {
        /// Provider id (`p-…`).
        id: String,
    },
    /// Register or update a host's origin.
    SetOrigin {
        /// Host clients use.
        host: String,
        /// http(s)://host[:port] of the origin.
        upstream: String,
        /// Send the site's Host to the origin instead of the upstream's name.
        #[arg(long)]
        forward_host: bool,
        /// Drop Set-Cookie from the origin's responses, so they are cached without it. Like
        /// every option of the origin, left out means off: the call replaces the whole row.
        #[arg(long)]
        strip_set_cookie: bool,
        /// A query parameter to leave out of the cache key (`utm_*` for a prefix, `*` for the
        /// whole query); repeat for several.
        #[arg(long = "cache-key-ignore-query", value_name = "NAME")]
        cache_key_ignore_query: Vec<String>,
    },
    /// List your origins (and your hosts awaiting approval).
    Origins,
    /// List hosts awaiting the operator's approval (operator token).
    HostClaims,
    /// Approve the claim on a host: it is registered and served (operator token).
    ApproveHost {
        /// Host.
        host: String,
    },
    /// Reject the claim on a host (operator token).
    RejectHost {
        /// Host.
        host: String,
    },
    /// Register a resource.
    AddResource {
        /// Host.
        #[arg(long)]
        host: String,
        /// Path or prefix.
        #[arg(long)]
        path: String,
        /// Treat the path as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Priority 0–10.
        #[arg(long, default_value_t = 5)]
        priority: i64,
        /// Shadow TTL in seconds.
        #[arg(long, default_value_t = 3600)]
        shadow_ttl: i64,
    },
    /// List your resources.
    Resources,
    /// Purge a path, a prefix or cache tags on every edge.
    Purge {
        /// Host.
        #[arg(long)]
        host: String,
        /// Exact path.
        #[arg(long, conflicts_with_all = ["prefix", "tag"])]
        path: Option<String>,
        /// Prefix.
        #[arg(long, conflicts_with = "tag")]
        prefix: Option<String>,
        /// A cache tag (`Surrogate-Key` / `Cache-Tag` of the origin's responses); repeat
        /// for several.
        #[arg(long)]
        tag: Vec<String>,
    },
    /// Request series of a resource (`host/path`).
    Series {
        /// Resource key.
        resource: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run {
            config,
            check,
            preflight,
        } => run(config, check, preflight),
        Cmd::Api { api, token, call } => match api_call(&api, &token, call) {
            Ok((v, complete)) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                if complete {
                    ExitCode::SUCCESS
                } else {
                    eprintln!("broker: done, but some edges did not confirm (HTTP 207; per-edge results above)");
                    ExitCode::from(3)
                }
            }
            Err(msg) => {
                eprintln!("broker: {msg}");
                ExitCode::from(1)
            }
        },
    }
}

fn run(config: Option<PathBuf>, check: bool, preflight: bool) -> ExitCode {
    let cfg = match BrokerConfig::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("broker: {e}");
            return ExitCode::from(2);
        }
    };
    if check || preflight {
        if preflight {
            if let Err(e) = broker::server::preflight(&cfg) {
                eprintln!("broker: {e}");
                return ExitCode::from(2);
            }
        }
        let files = if preflight {
            "data_dir writable, access log opens, certificates load, saved state reads"
        } else {
            "values only; files and ports are opened at start"
        };
        println!(
            "broker: configuration OK ({} edges; {files})",
            cfg.edges.len()
        );
        return ExitCode::SUCCESS;
    }
    // Caught before the build: a stop asked for while the broker restores its state waits for
    // the server instead of killing the process.
    let stop = match StopSignals::catch() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("broker: cannot catch stop signals: {e}");
            return ExitCode::from(1);
        }
    };
    match Broker::build(cfg) {
        Ok(b) => {
            b.run(stop);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("broker: {e}");
            ExitCode::from(1)
        }
    }
}

/// Make one provider-API call: its JSON answer, and whether every edge confirmed it (a 207
/// says some did not).
fn api_call(api: &str, token: &str, call: Call) -> Result<(Value, bool), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let api = api.trim_end_matches('/');
    // Redirects are not followed: a 303 would turn a POST into a GET of a list, answered 200
    // with nothing done.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let (method, path, body) = match call {
        Call::CreateProvider { name } => (
            reqwest::Method::POST,
            "/v1/providers".to_string(),
            Some(json!({ "name": name })),
        ),
        Call::RotateToken { id } => (
            reqwest::Method::POST,
            format!("/v1/providers/{}/token", segment(&id)),
            None,
        ),
        Call::SetOrigin {
            host,
            upstream,
            forward_host,
            strip_set_cookie,
            cache_key_ignore_query,
        } => {
            let mut body = json!({ "upstream": upstream, "forward_host": forward_host });
            // Only when set, so the CLI still works against a broker older than the option.
            if strip_set_cookie {
                body["strip_set_cookie"] = json!(true);
            }
            if !cache_key_ignore_query.is_empty() {
                body["cache_key_ignore_query"] = json!(cache_key_ignore_query);
            }
            (
                reqwest::Method::PUT,
                format!("/v1/origins/{}", segment(&host)),
                Some(body),
            )
        }
        Call::Origins => (reqwest::Method::GET, "/v1/origins".into(), None),
        Call::HostClaims => (reqwest::Method::GET, "/v1/host-claims".into(), None),
        Call::ApproveHost { host } => (
            reqwest::Method::POST,
            format!("/v1/host-claims/{}/approve", segment(&host)),
            None,
        ),
        Call::RejectHost { host } => (
            reqwest::Method::DELETE,
            format!("/v1/host-claims/{}", segment(&host)),
            None,
        ),
        Call::AddResource {
            host,
            path,
            prefix,
            priority,
            shadow_ttl,
        } => (
            reqwest::Method::POST,
            "/v1/resources".into(),
            Some(json!({
                "host": host, "path": path,
                "match": if prefix { "prefix" } else { "exact" },
                "priority": priority, "shadow_ttl_secs": shadow_ttl,
            })),
        ),
        Call::Resources => (reqwest::Method::GET, "/v1/resources".into(), None),
        Call::Purge {
            host,
            path,
            prefix,
            tag,
        } => {
            let tags = (!tag.is_empty()).then_some(tag);
            (
                reqwest::Method::POST,
                "/v1/purge".into(),
                Some(json!({ "host": host, "path": path, "prefix": prefix, "tags": tags })),
            )
        }
        Call::Series { resource } => (
            reqwest::Method::GET,
            format!("/v1/series?resource={}", urlencode(&resource)),
            None,
        ),
    };
    rt.block_on(async {
        let mut req = client
            .request(method, format!("{api}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {api}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        // Only a 204 is empty in the API; an empty success otherwise came from something
        // else, and a 3xx is no success of the API's either.
        if status.is_redirection()
            || (text.is_empty() && status.is_success() && status != reqwest::StatusCode::NO_CONTENT)
        {
            return Err(format!(
                "{status} from {api}, but not the broker API's answer (check --api)"
            ));
        }
        let v: Value = if text.is_empty() {
            json!({})
        } else {
            match serde_json::from_str(&text) {
                Ok(v) => v,
                // A success that is not the API's JSON came from something else listening
                // there: not a success.
                Err(_) if status.is_success() => {
                    return Err(format!(
                        "{status} from {api}, but not the broker API's JSON: {text}"
                    ))
                }
                Err(_) => json!({ "body": text }),
            }
        };
        if status.is_success() {
            Ok((v, status != reqwest::StatusCode::MULTI_STATUS))
        } else {
            Err(format!(
                "{status}: {}",
                v["message"].as_str().unwrap_or(&text)
            ))
        }
    })
}

/// `s` as one path segment: a `/`, `?` or `#` in an id or host names no other record and no
/// query (the API then refuses the id, or the host, as it is).
fn segment(s: &str) -> String {
    urlencode(s).replace('/', "%2F")
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-request HTTP server answering `response`; its address and the request line.
    fn answer_once(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let served = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut header = String::new();
            while reader.read_line(&mut header).unwrap() > 2 {
                header.clear();
            }
            reader.get_mut().write_all(response.as_bytes()).unwrap();
            line
        });
        (addr, served)
    }

    #[test]
    fn ids_and_hosts_stay_one_path_segment() {
        let (api, served) = answer_once("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        let call = Call::RotateToken {
            id: "p-x/../p-y".into(),
        };
        assert!(api_call(&api, "t", call).is_err());
        assert_eq!(
            served.join().unwrap().trim_end(),
            "POST /v1/providers/p-x%2F..%2Fp-y/token HTTP/1.1"
        );
        assert_eq!(segment("a.com?x#y"), "a.com%3Fx%23y");
    }

    #[test]
    fn a_success_that_is_not_the_apis_json_is_an_error() {
        let body = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        let (api, served) = answer_once(body);
        let err = api_call(&api, "t", Call::Origins).unwrap_err();
        served.join().unwrap();
        assert!(err.contains("not the broker API's JSON"), "{err}");
    }

    #[test]
    fn an_empty_success_or_a_redirect_is_not_the_apis_answer() {
        for answer in [
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 303 See Other\r\nlocation: /v1/resources\r\ncontent-length: 0\r\n\r\n",
        ] {
            let (api, served) = answer_once(answer);
            let err = api_call(&api, "t", Call::Origins).unwrap_err();
            served.join().unwrap();
            assert!(
                err.contains("not the broker API's answer"),
                "{answer}: {err}"
            );
        }
        let (api, served) = answer_once("HTTP/1.1 204 No Content\r\n\r\n");
        assert!(api_call(&api, "t", Call::Origins).is_ok());
        served.join().unwrap();
    }
}
