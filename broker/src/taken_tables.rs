//! The origin table each edge last took, by host, kept across restarts.
//!
//! An edge that refuses the broker's table routes by the one it last took, and the broker
//! keeps off it the hosts that table routes otherwise ([`crate::origin_gaps`]). It learns the
//! edge's table from the edge (`GET /origins`), but when the refusal is the credentials' (a
//! token rotated on one side only) that read is refused too. What the edge last took is then
//! still known here: the rows of every table an edge accepted, as one hash per host. The file
//! lives in the broker's data directory, because rotating a token usually starts by
//! restarting the broker with the new one.
//!
//! It only says which hosts to keep off an edge: a file that cannot be read starts empty (the
//! hosts are then kept off as before this memory, and the next table an edge takes is saved
//! over it), and a write that fails is logged and counted and tried again at the next change.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use edge_node::durable::{read_json, write_atomic};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::metrics::BrokerMetrics;
use crate::origin_gaps::HostRows;

/// The file's form. Hosts are sorted so that one state is always written the same way.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// Per edge id, the hash of each host's rows in the table it last took.
    edges: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Default)]
struct Tables {
    by_edge: HashMap<String, Arc<HostRows>>,
    /// Moves on every change: a save skips its write when a later or equal one was written.
    version: u64,
}

/// Per edge id, the rows of the origin table it last took.
pub struct TakenTables {
    path: PathBuf,
    tables: Mutex<Tables>,
    /// The version last written; held while writing, so writes go one at a time.
    writer: Mutex<u64>,
    metrics: BrokerMetrics,
}

impl TakenTables {
    /// The tables saved at `path` for the edges of `ids` (an edge no longer in the fleet is
    /// forgotten). A missing file is an empty memory; an unreadable one too, said in the log.
    pub fn open(path: PathBuf, ids: &[&str], metrics: BrokerMetrics) -> Self {
        let by_edge = match read_json::<Saved>(&path) {
            Ok(saved) => saved
                .map(|s| s.edges)
                .unwrap_or_default()
                .into_iter()
                .filter(|(id, _)| ids.contains(&id.as_str()))
                .map(|(id, rows)| (id, Arc::new(rows.into_iter().collect())))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e,
                    "origin tables the edges took cannot be read: starting without them");
                HashMap::new()
            }
        };
        TakenTables {
            path,
            tables: Mutex::new(Tables {
                by_edge,
                version: 0,
            }),
            writer: Mutex::new(0),
            metrics,
        }
    }

    /// The rows of the table edge `id` last took, if it took one this broker knows of.
    pub fn get(&self, id: &str) -> Option<Arc<HostRows>> {
        self.tables.lock().by_edge.get(id).cloned()
    }

    /// Edge `id` took a table with `rows`; whether that changes what is known of it (then
    /// [`Self::save`] makes it durable).
    pub fn took(&self, id: &str, rows: Arc<HostRows>) -> bool {
        let mut tables = self.tables.lock();
        let same = |known: &Arc<HostRows>| Arc::ptr_eq(known, &rows) || **known == *rows;
        if tables.by_edge.get(id).is_some_and(same) {
            return false;
        }
        tables.by_edge.insert(id.to_string(), rows);
        tables.version += 1;
        true
    }

    /// Write what is known to disk, off the async workers.
    pub async fn save(self: &Arc<Self>) {
        let this = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || this.save_now()).await {
            tracing::error!(error = %e, "origin tables the edges took not saved");
        }
    }

    fn save_now(&self) {
        let mut written = self.writer.lock();
        let (version, saved) = {
            let tables = self.tables.lock();
            if *written >= tables.version {
                // A write that started after this change carried it.
                return;
            }
            let edges = tables
                .by_edge
                .iter()
                .map(|(id, rows)| {
                    let rows = rows.iter().map(|(h, r)| (h.clone(), *r)).collect();
                    (id.clone(), rows)
                })
                .collect();
            (tables.version, Saved { edges })
        };
        let res = serde_json::to_vec(&saved)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomic(&self.path, &bytes));
        match res {
            Ok(()) => *written = version,
            Err(e) => {
                self.metrics.taken_tables_save_failures.inc();
                tracing::error!(error = %e, path = %self.path.display(),
                    "origin tables the edges took not saved");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> BrokerMetrics {
        BrokerMetrics::register(&prometheus::Registry::new()).unwrap()
    }

    fn rows(pairs: &[(&str, u64)]) -> Arc<HostRows> {
        Arc::new(pairs.iter().map(|(h, r)| (h.to_string(), *r)).collect())
    }

    /// What each edge took survives a restart; an edge that left the fleet is forgotten; a
    /// table taken again unchanged is no change.
    #[tokio::test]
    async fn tables_taken_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-tables.json");
        let taken = Arc::new(TakenTables::open(path.clone(), &["a", "b"], metrics()));
        assert!(taken.get("a").is_none());
        assert!(taken.took("a", rows(&[("x.test", 1), ("y.test", 2)])));
        assert!(taken.took("b", rows(&[("x.test", 1)])));
        assert!(!taken.took("b", rows(&[("x.test", 1)])));
        taken.save().await;
        let again = TakenTables::open(path.clone(), &["a"], metrics());
        assert_eq!(
            again.get("a").unwrap(),
            rows(&[("x.test", 1), ("y.test", 2)])
        );
        assert!(again.get("b").is_none(), "no longer in the fleet");
    }

    /// A file that is not one of these starts an empty memory, and the next table taken is
    /// saved over it.
    #[tokio::test]
    async fn an_unreadable_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-tables.json");
        std::fs::write(&path, b"{ not json").unwrap();
        let taken = Arc::new(TakenTables::open(path.clone(), &["a"], metrics()));
        assert!(taken.get("a").is_none());
        assert!(taken.took("a", rows(&[("x.test", 7)])));
        taken.save().await;
        let again = TakenTables::open(path, &["a"], metrics());
        assert_eq!(again.get("a").unwrap(), rows(&[("x.test", 7)]));
    }
}
