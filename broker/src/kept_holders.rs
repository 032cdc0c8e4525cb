//! Writes the peer holders ([`Holders`]) to `data_dir` every `[peer_fill] snapshot_secs` and
//! at a graceful stop, and reads them back at start: a restarted broker keeps hinting the
//! copies its edges held (see `routing::holders` for what the file keeps and how it maps
//! edges).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::control::Control;
use crate::routing::{Fleet, Holders};

/// In `data_dir`: the peer holders kept across a restart.
pub const HOLDERS_FILE: &str = "peer-holders.msgpack";

/// The holders, where they are kept, and what names the edges and their caches.
pub struct HoldersKeeper {
    holders: Arc<Holders>,
    path: PathBuf,
    fleet: Arc<Fleet>,
    /// The edges' cache ids, from their stats; none without a control link (peer fill needs
    /// one, so then no holder is hinted anyway).
    control: Option<Arc<Control>>,
    every: Option<Duration>,
}

impl HoldersKeeper {
    /// Keep `holders` at `path`, written every `every_secs` (0: only at stop). Reads back what
    /// a previous process kept there, before any request is recorded; a file that cannot be
    /// read is logged and replaced by the next write.
    pub fn restoring(
        holders: Arc<Holders>,
        path: PathBuf,
        fleet: Arc<Fleet>,
        control: Option<Arc<Control>>,
        every_secs: u64,
    ) -> Self {
        let edges: Vec<(&str, usize)> = fleet
            .edges
            .iter()
            .enumerate()
            .map(|(e, edge)| (edge.id.as_str(), fleet.edge_region(e)))
            .collect();
        match holders.restore(&path, &edges, crate::clock::now_secs()) {
            Ok(r) if r.keys > 0 || r.dropped > 0 => tracing::info!(
                keys = r.keys,
                dropped = r.dropped,
                "peer holders read back: misses are hinted to the copies edges held before the restart"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e,
                "peer holders not read back: they are learnt again as the edges serve, and the file is replaced at the next write"),
        }
        HoldersKeeper {
            holders,
            path,
            fleet,
            control,
            every: (every_secs > 0).then(|| Duration::from_secs(every_secs)),
        }
    }

    /// Write the holders now (blocking: call off the async workers).
    pub fn save(&self) {
        let ids: Vec<&str> = self.fleet.edges.iter().map(|e| e.id.as_str()).collect();
        let control = self.control.as_deref();
        let cache_of = |e| control.and_then(|c| c.stats(e)).map_or(0, |s| s.cache_id);
        let started = Instant::now();
        match self.holders.save(&self.path, &ids, cache_of) {
            Ok(keys) => tracing::debug!(keys, took = ?started.elapsed(), "peer holders written"),
            Err(e) => tracing::warn!(error = %e,
                "peer holders not written: a restart would hint only what the edges serve after it"),
        }
    }
}

/// With peer fill off, a file left at `path` from before names copies that may be purged
/// since: removed, so that turning it on again starts from what the edges serve then.
pub fn remove_left(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(file = %path.display(), "peer fill off: its kept holders removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), error = %e,
            "peer fill off: its kept holders not removed"),
    }
}

/// Background service writing the holders every `snapshot_secs`; the write at stop is the
/// drain's final step, after the last request was recorded.
pub struct HoldersKeeperService(pub Arc<HoldersKeeper>);

#[async_trait]
impl BackgroundService for HoldersKeeperService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(every) = self.0.every else {
            return;
        };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let keeper = self.0.clone();
            let _ = tokio::task::spawn_blocking(move || keeper.save()).await;
        }
    }
}
