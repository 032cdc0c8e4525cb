//! The stop signals (SIGTERM, SIGINT, SIGQUIT), caught from before the server is built.
//!
//! pingora installs its signal handlers when its main loop starts, after every service and
//! listener is up. A SIGTERM before that took the default action: the process died of it
//! mid-start (a pod deleted while its edge recovered the disk tier, a unit stopped just after
//! it started) with no drain and none of the final steps (the edge's cache flush, the broker's
//! monitor snapshot). [`StopSignals::catch`] installs the handlers at once and hands pingora a
//! watch that returns the first signal whenever it came, so a SIGTERM (or SIGQUIT) during
//! start-up runs as a normal stop as soon as the server is up. SIGINT, pingora's stop without
//! a drain, ends a starting process at once, as does a second signal while the first still
//! waits for the server: a start-up that hangs can still be stopped. Either exits with 128 +
//! the signal's number, as a shell reports a process the signal killed.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// A stop signal caught; the three pingora understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGTERM: drain and exit.
    Terminate,
    /// SIGINT: exit without draining.
    Fast,
    /// SIGQUIT: hand the listeners to a new process, then drain and exit.
    Upgrade,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::Terminate => "SIGTERM",
            Stop::Fast => "SIGINT",
            Stop::Upgrade => "SIGQUIT",
        }
    }

    /// The exit status of a process ended by this signal (128 + its number), as a shell
    /// reports one killed by it.
    fn exit_code(self) -> i32 {
        128 + match self {
            Stop::Terminate => libc::SIGTERM,
            Stop::Fast => libc::SIGINT,
            Stop::Upgrade => libc::SIGQUIT,
        }
    }
}

/// The server has not reached its main loop yet.
const STARTING: u8 = 0;
/// pingora's main loop is waiting on [`StopSignals`]: it takes the next signal.
const SERVING: u8 = 1;

/// The stop signals of this process, caught from [`StopSignals::catch`] on; given to pingora
/// by [`StopSignals::run_args`].
pub struct StopSignals {
    first: watch::Receiver<Option<Stop>>,
    phase: Arc<AtomicU8>,
}

impl StopSignals {
    /// Catch SIGTERM, SIGINT and SIGQUIT from now on, on a thread of their own (the server's
    /// runtimes do not exist yet). Call before building the server.
    pub fn catch() -> std::io::Result<StopSignals> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let signals = {
            let _in_rt = rt.enter();
            [
                (Stop::Terminate, signal(SignalKind::terminate())?),
                (Stop::Fast, signal(SignalKind::interrupt())?),
                (Stop::Upgrade, signal(SignalKind::quit())?),
            ]
        };
        let (tx, first) = watch::channel(None);
        let phase = Arc::new(AtomicU8::new(STARTING));
        let seen = phase.clone();
        std::thread::Builder::new()
            .name("stop-signals".into())
            .spawn(move || rt.block_on(forward(signals, tx, seen)))?;
        Ok(StopSignals { first, phase })
    }

    /// pingora's run arguments with these signals as its shutdown watch.
    pub fn run_args(self) -> RunArgs {
        RunArgs {
            shutdown_signal: Box::new(self),
        }
    }
}

/// Pass the first signal on; end the process on SIGINT or a second signal that comes before
/// the server took the first. Later ones are ignored, as pingora's own handler ignores them.
async fn forward(
    [(t, mut term), (i, mut int), (q, mut quit)]: [(Stop, Signal); 3],
    tx: watch::Sender<Option<Stop>>,
    phase: Arc<AtomicU8>,
) {
    loop {
        let stop = tokio::select! {
            Some(()) = term.recv() => t,
            Some(()) = int.recv() => i,
            Some(()) = quit.recv() => q,
            else => return,
        };
        let serving = phase.load(Ordering::Acquire) == SERVING;
        match *tx.borrow() {
            None if !serving && stop == Stop::Fast => {
                tracing::warn!("SIGINT during start-up: exiting now");
                std::process::exit(stop.exit_code());
            }
            None if !serving => tracing::info!(
                signal = stop.name(),
                "stop signal during start-up: the server stops as soon as it is up (a second \
                 signal before then exits at once)"
            ),
            Some(first) if !serving => {
                tracing::warn!(
                    signal = stop.name(),
                    first = first.name(),
                    "second stop signal during start-up: exiting now, without a graceful stop"
                );
                std::process::exit(stop.exit_code());
            }
            _ => {}
        }
        tx.send_if_modified(|first| {
            let unset = first.is_none();
            if unset {
                *first = Some(stop);
            }
            unset
        });
    }
}

#[async_trait]
impl ShutdownSignalWatch for StopSignals {
    async fn recv(&self) -> ShutdownSignal {
        self.phase.store(SERVING, Ordering::Release);
        let mut first = self.first.clone();
        let stop = match first.wait_for(Option::is_some).await {
            Ok(stop) => *stop,
            Err(_) => None,
        };
        match stop {
            Some(Stop::Terminate) => ShutdownSignal::GracefulTerminate,
            Some(Stop::Fast) => ShutdownSignal::FastShutdown,
            Some(Stop::Upgrade) => ShutdownSignal::GracefulUpgrade,
            // The signals' thread is gone (its runtime failed): pingora's own watch takes the
            // signals from here on (tokio hands each one to every listener), so they still stop
            // the server.
            None => {
                tracing::error!(
                    "stop signals' thread ended: listening for them on the server's runtime"
                );
                UnixShutdownSignalWatch.recv().await
            }
        }
    }
}
