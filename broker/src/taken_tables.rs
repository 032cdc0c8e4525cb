//! The origin table each edge last took, by host, kept across restarts.
//!
//! An edge that refuses the broker's table routes by the one it last took, and the broker
//! keeps off it the hosts that table routes otherwise ([`crate::origin_gaps`]). It learns the
//! edge's table from the edge (`GET /origins`), but when the refusal is the credentials' (a
//! token rotated on one side only) that read is refused too. What the edge last took is then
//! still known here: the rows of every table an edge accepted, or that its `GET /origins`
//! listed, as one hash per host. The file lives in the broker's data directory, because
//! rotating a token usually starts by restarting the broker with the new one.
//!
//! It only says which hosts to keep off an edge: a file that cannot be read, or was written
//! with another row form (hashes of rows with other fields), starts empty — the hosts are then
//! kept off as before this memory — and the next table an edge takes is saved over it. A write
//! that fails is logged and counted, and tried again at the next push.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edge_node::config::ORIGIN_ENTRY_FIELDS;
use edge_node::durable::{read_json, write_atomic};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::metrics::BrokerMetrics;
use crate::origin_gaps::HostRows;

/// The file's form. Edges that took the same table share one entry of `tables`.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// What the hashes are of ([`row_form`]): hashes of another form compare unequal to every
    /// row, and would keep every host off every refusing edge.
    rows: String,
    /// Each distinct table: the hash of each host's rows.
    tables: Vec<BTreeMap<String, u64>>,
    /// Per edge id, its table's index in `tables`.
    edges: BTreeMap<String, usize>,
}

/// The form of the rows hashed: the fields of a row as this build writes them.
fn row_form() -> String {
    format!("1:{}", ORIGIN_ENTRY_FIELDS.join(","))
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
    /// Held while writing, so writes go one at a time.
    writer: Mutex<()>,
    /// The version last written.
    written: AtomicU64,
    metrics: BrokerMetrics,
}

impl TakenTables {
    /// The tables saved at `path` for the edges of `ids` (an edge no longer in the fleet is
    /// forgotten). A missing file is an empty memory; an unreadable one too, said in the log.
    pub fn open(path: PathBuf, ids: &[&str], metrics: BrokerMetrics) -> Self {
        let by_edge = match read_json::<Saved>(&path) {
            Ok(Some(saved)) if saved.rows == row_form() => {
                let tables: Vec<Arc<HostRows>> = saved
                    .tables
                    .into_iter()
                    .map(|rows| Arc::new(rows.into_iter().collect()))
                    .collect();
                saved
                    .edges
                    .into_iter()
                    .filter(|(id, _)| ids.contains(&id.as_str()))
                    .filter_map(|(id, i)| Some((id, tables.get(i)?.clone())))
                    .collect()
            }
            Ok(Some(_)) => {
                tracing::info!(path = %path.display(),
                    "origin tables the edges took were saved with another row form: starting without them");
                HashMap::new()
            }
            Ok(None) => HashMap::new(),
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
            writer: Mutex::new(()),
            written: AtomicU64::new(0),
            metrics,
        }
    }

    /// The rows of the table edge `id` last took, if it took one this broker knows of.
    pub fn get(&self, id: &str) -> Option<Arc<HostRows>> {
        self.tables.lock().by_edge.get(id).cloned()
    }

    /// Edge `id` took a table with `rows`; whether what is known is not yet on disk (this
    /// changed it, or an earlier write failed): then [`Self::save`] should follow.
    pub fn took(&self, id: &str, rows: Arc<HostRows>) -> bool {
        let mut tables = self.tables.lock();
        match tables.by_edge.get_mut(id) {
            Some(known) if Arc::ptr_eq(known, &rows) => {}
            // The same rows: keep the caller's copy, so that the next push finds it by
            // pointer instead of comparing every host again.
            Some(known) if **known == *rows => *known = rows,
            _ => {
                tables.by_edge.insert(id.to_string(), rows);
                tables.version += 1;
            }
        }
        self.written.load(Ordering::Acquire) < tables.version
    }

    /// Write what is known to disk, off the async workers, if it changed since the last
    /// write (called after every push: most find nothing to do, and do not leave this task).
    pub async fn save(self: &Arc<Self>) {
        if self.written.load(Ordering::Acquire) >= self.tables.lock().version {
            return;
        }
        let this = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || this.save_now()).await {
            tracing::error!(error = %e, "origin tables the edges took not saved");
        }
    }

    fn save_now(&self) {
        let _writing = self.writer.lock();
        let (version, by_edge) = {
            let tables = self.tables.lock();
            if self.written.load(Ordering::Acquire) >= tables.version {
                // A write that started after this change carried it.
                return;
            }
            (tables.version, tables.by_edge.clone())
        };
        let mut saved = Saved {
            rows: row_form(),
            tables: Vec::new(),
            edges: BTreeMap::new(),
        };
        let mut distinct: Vec<&Arc<HostRows>> = Vec::new();
        for (id, rows) in &by_edge {
            let i = match distinct.iter().position(|d| Arc::ptr_eq(d, rows)) {
                Some(i) => i,
                None => {
                    distinct.push(rows);
                    saved
                        .tables
                        .push(rows.iter().map(|(h, r)| (h.clone(), *r)).collect());
                    distinct.len() - 1
                }
            };
            saved.edges.insert(id.clone(), i);
        }
        let res = serde_json::to_vec(&saved)
            .map_err(io::Error::other)
            .and_then(|bytes| write_atomic(&self.path, &bytes));
        match res {
            Ok(()) => self.written.store(version, Ordering::Release),
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

    /// What each edge took survives a restart, a table shared by edges saved once; an edge
    /// that left the fleet is forgotten; a table taken again unchanged is no change.
    #[tokio::test]
    async fn tables_taken_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-tables.json");
        let taken = Arc::new(TakenTables::open(path.clone(), &["a", "b", "c"], metrics()));
        assert!(taken.get("a").is_none());
        let shared = rows(&[("x.test", 1)]);
        assert!(taken.took("a", rows(&[("x.test", 1), ("y.test", 2)])));
        assert!(taken.took("b", shared.clone()));
        assert!(taken.took("c", shared.clone()));
        taken.save().await;
        assert!(!taken.took("b", rows(&[("x.test", 1)])));
        let saved: Saved = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(saved.tables.len(), 2, "b and c share theirs");
        let again = TakenTables::open(path.clone(), &["a", "c"], metrics());
        assert_eq!(
            again.get("a").unwrap(),
            rows(&[("x.test", 1), ("y.test", 2)])
        );
        assert_eq!(again.get("c").unwrap(), shared);
        assert!(again.get("b").is_none(), "no longer in the fleet");
    }

    /// A file that is not one of these, or hashes rows of another form, starts an empty
    /// memory, and the next table taken is saved over it.
    #[tokio::test]
    async fn an_unreadable_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-tables.json");
        let other_form = r#"{"rows":"0:host","tables":[{"x.test":1}],"edges":{"a":0}}"#;
        for content in ["{ not json", other_form] {
            std::fs::write(&path, content).unwrap();
            let taken = Arc::new(TakenTables::open(path.clone(), &["a"], metrics()));
            assert!(taken.get("a").is_none());
            assert!(taken.took("a", rows(&[("x.test", 7)])));
            taken.save().await;
            let again = TakenTables::open(path.clone(), &["a"], metrics());
            assert_eq!(again.get("a").unwrap(), rows(&[("x.test", 7)]));
        }
    }

    /// A write that failed is tried again at the next push, though nothing changed.
    #[tokio::test]
    async fn a_failed_write_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("edge-tables.json");
        let m = metrics();
        let taken = Arc::new(TakenTables::open(path.clone(), &["a"], m.clone()));
        assert!(taken.took("a", rows(&[("x.test", 7)])));
        taken.save().await;
        assert_eq!(m.taken_tables_save_failures.get(), 1);
        std::fs::create_dir(path.parent().unwrap()).unwrap();
        assert!(taken.took("a", rows(&[("x.test", 7)])), "still unsaved");
        taken.save().await;
        assert!(!taken.took("a", rows(&[("x.test", 7)])));
        let again = TakenTables::open(path, &["a"], metrics());
        assert_eq!(again.get("a").unwrap(), rows(&[("x.test", 7)]));
    }
}
