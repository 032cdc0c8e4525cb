//! Start the workspace's real binaries and stop them like an operator would.

use rustix::process::Signal;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A loopback port, free for TCP and UDP a moment ago, for a child process to listen on.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`): a port the
/// kernel handed out for `bind(0)` could be taken, before the child binds it, as the source
/// port of any outgoing connection — the tests' own HTTP clients make many — while ports
/// below the range are only ever taken by an explicit bind. A port is checked for UDP too,
/// since edges serve QUIC on their HTTP port; and no port is handed out twice by one test
/// process, whose tests pick ports concurrently.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<std::collections::HashSet<u16>>> = Mutex::new(None);
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > 20_000)
        .unwrap_or(32_768);
    let (low, span) = (10_000u32, u32::from(first_ephemeral) - 10_000);
    // A different walk per process: concurrent test processes rarely try the same ports.
    let mut next = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish() as u32
    };
    for _ in 0..5000 {
        next = next.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = (low + (next >> 8) % span) as u16;
        let free = TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if !free {
            continue;
        }
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(Default::default).insert(port) {
            return port;
        }
    }
    panic!("no loopback port below {first_ephemeral} free for both TCP and UDP");
}

/// A binary of this workspace, built on first use with the same profile as the tests.
pub struct Binary {
    path: PathBuf,
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

impl Binary {
    /// Build (if needed) and locate the workspace binary `bin`.
    pub fn get(bin: &str) -> Binary {
        // target/<profile>/deps/<test-exe> → target/<profile>
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(|p| p.parent())
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // `--workspace --tests` resolves features as `cargo test --workspace` did, so the
        // binary links the dependencies that run already compiled; `-p <package>` alone
        // resolves a different feature set and compiles dozens of crates a second time
        // (a minute of CPU and gigabytes of target/ on a CI machine).
        cmd.args(["build", "-q", "--workspace", "--tests", "--bin", bin]);
        // Cargo gives a test process its own package's variables; some build scripts (ring's)
        // rerun when one changes, so passing them on would rebuild half the dependency tree
        // here and again in the next plain `cargo build`.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(set_by_cargo_for_the_test) {
                cmd.env_remove(name);
            }
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building {bin} failed");
        Binary {
            path: profile_dir.join(bin),
        }
    }

    /// A command for this binary.
    pub fn command(&self) -> Command {
        Command::new(&self.path)
    }

    /// A command for this binary that the kernel kills when the thread starting it ends:
    /// a test process that is itself killed (a CI timeout, Ctrl-C) runs no destructors, and
    /// its servers would stay on their ports. Tests start children on their own thread,
    /// which lives as long as the test. util-linux's `setpriv` asks for it and then
    /// becomes the binary (the workspace forbids the `unsafe` a `pre_exec` would need);
    /// without `setpriv` the binary starts as is.
    fn dying_with_this_thread(&self) -> Command {
        static SETPRIV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let setpriv = *SETPRIV.get_or_init(|| {
            Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--", "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !setpriv {
            return self.command();
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(&self.path);
        cmd
    }

    /// Start it with `args`; its output goes to a log file kept for failure reports, and
    /// printed (its last lines) when a test fails while it runs. `SHADOWCDN_TEST_LOG` in the
    /// test's environment sets every child's `RUST_LOG` (to see more of a failing test).
    pub fn spawn(&self, args: &[&str], envs: &[(&str, &str)]) -> Child {
        let log = tempfile::NamedTempFile::new().expect("temp log file");
        let out = log.reopen().expect("reopen log");
        let err = log.reopen().expect("reopen log");
        let mut cmd = self.dying_with_this_thread();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        if let Ok(level) = std::env::var("SHADOWCDN_TEST_LOG") {
            // The test's own directives for single targets (a log line it reads) are kept.
            let own = envs.iter().rev().find(|(k, _)| *k == "RUST_LOG");
            let targets = own.map(|(_, v)| v.split(',').filter(|d| d.contains('=')));
            let all: Vec<&str> = std::iter::once(level.as_str())
                .chain(targets.into_iter().flatten())
                .collect();
            cmd.env("RUST_LOG", all.join(","));
        }
        let child = cmd.spawn().expect("spawn binary");
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        Child {
            child: Some(child),
            log,
            name: format!("{} {}", name.unwrap_or_default(), args.join(" ")),
            spawned: Instant::now(),
        }
    }
}

/// Whether `name` is one of the variables cargo sets for the crate it runs (not one that
/// configures cargo itself, such as `CARGO_HOME` or `CARGO_TARGET_DIR`).
fn set_by_cargo_for_the_test(name: &str) -> bool {
    [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
    ]
    .iter()
    .any(|p| name.starts_with(p))
        || matches!(
            name,
            "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "CARGO_RUSTC_CURRENT_DIR"
        )
}

/// A running process; killed (SIGKILL) when dropped if still alive.
pub struct Child {
    child: Option<std::process::Child>,
    log: tempfile::NamedTempFile,
    /// The binary and its arguments, to name its log in a failure report.
    name: String,
    /// When it was spawned ([`SIGNAL_AFTER`]).
    spawned: Instant,
}

/// How long after its spawn a child that does not catch a signal is sent it anyway. The
/// servers catch their stop signals a few milliseconds into their start (after reading their
/// configuration); a signal sooner takes the default action (the process dies of it, with no
/// exit code), which a test that stops a server right after starting it would take for a
/// failed graceful stop. So a child is signalled once it catches the signal, or after this.
const SIGNAL_AFTER: Duration = Duration::from_secs(1);

/// Lines of each child's log a failing test prints, unless `SHADOWCDN_TEST_LOG_LINES` says.
const LOG_TAIL_LINES: usize = 60;

impl Child {
    /// A child that is not running (to be replaced by a spawn).
    pub fn placeholder() -> Child {
        Child {
            child: None,
            log: tempfile::NamedTempFile::new().expect("temp log file"),
            name: String::new(),
            spawned: Instant::now(),
        }
    }

    /// Wait until `addr` accepts TCP connections, failing with the process log if it exits.
    pub fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("process exited early ({status}):\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "{addr} not listening after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Send SIGTERM and wait for a graceful exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal(Signal::TERM)
    }

    /// Send SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process has its own handler for `sig` (its `SigCgt` mask in /proc); false
    /// once it has exited.
    pub fn catches(&self, sig: Signal) -> bool {
        let Some(c) = self.child.as_ref() else {
            return false;
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", c.id()));
        let mask = status.ok().and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        });
        mask.is_some_and(|m| m & (1 << (sig.as_raw() - 1)) != 0)
    }

    /// Wait until the process catches `sig`, at most `within` after its spawn; false if it
    /// exited or did not by then.
    pub fn wait_catching(&mut self, sig: Signal, within: Duration) -> bool {
        loop {
            if self.catches(sig) {
                return true;
            }
            let running = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            if !running || self.spawned.elapsed() >= within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn signal(&mut self, sig: Signal) -> Option<i32> {
        self.child.as_ref()?;
        self.wait_catching(sig, SIGNAL_AFTER);
        let mut c = self.child.take()?;
        let pid = rustix::process::Pid::from_raw(c.id() as i32).expect("a child's pid is positive");
        if let Err(e) = rustix::process::kill_process(pid, sig) {
            let _ = c.kill();
            panic!("could not send {sig:?} to {}: {e}", c.id());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "process did not exit within 60 s of signal {sig:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let running = self.child.is_some();
        self.kill();
        if running && std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let wanted = std::env::var("SHADOWCDN_TEST_LOG_LINES").ok();
            let wanted = wanted
                .and_then(|n| n.parse().ok())
                .unwrap_or(LOG_TAIL_LINES);
            let tail = &lines[lines.len().saturating_sub(wanted)..];
            if !tail.is_empty() {
                eprintln!("--- last lines of {} ---\n{}", self.name, tail.join("\n"));
            }
        }
    }
}
