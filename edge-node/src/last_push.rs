//! The last origin table the broker pushed, kept on disk.
//!
//! Pushed rows live in memory, and the broker pushes every few seconds; without this file a
//! restarted edge would answer every pushed host with 404 `unknown_host` until that next
//! push (or for as long as the broker is down). The edge loads the file at start and applies
//! it as a push. It is rewritten, atomically, only when a push changes it.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::OriginEntry;

/// File name, in the cache directory.
pub const FILE_NAME: &str = "pushed-origins.json";

/// What the file holds: the rows as the edge applied them and the push's private-address
/// permission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The pushed rows (fields this edge knows only).
    pub origins: Vec<OriginEntry>,
    /// Whether the broker let these rows use private addresses.
    pub allow_private_upstreams: bool,
}

/// Why the file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LastPushError {
    /// Reading failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Not a file this edge writes.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// The file and what was last written to it.
#[derive(Debug)]
pub struct LastPush {
    path: PathBuf,
    written: Mutex<Vec<u8>>,
}

impl LastPush {
    /// The file in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        LastPush {
            path: dir.join(FILE_NAME),
            written: Mutex::new(Vec::new()),
        }
    }

    /// The saved push, `None` when there is none.
    pub fn load(&self) -> Result<Option<Saved>, LastPushError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LastPushError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let saved = serde_json::from_slice(&bytes).map_err(|source| LastPushError::Format {
            path: self.path.clone(),
            source,
        })?;
        *self.written.lock() = bytes;
        Ok(Some(saved))
    }

    /// Write `saved` unless it is what the file already holds (temporary file, fsync,
    /// rename, fsync of the directory).
    pub fn save(&self, saved: &Saved) -> io::Result<()> {
        let bytes = serde_json::to_vec(saved).map_err(io::Error::other)?;
        let mut written = self.written.lock();
        if *written == bytes {
            return Ok(());
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        *written = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_push_reads_back_and_an_unchanged_one_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let last = LastPush::in_dir(dir.path());
        assert!(last.load().unwrap().is_none());
        let saved = Saved {
            origins: vec![OriginEntry {
                host: "a.test".into(),
                path_prefix: None,
                upstream: "http://127.0.0.1:9".into(),
                forward_host: false,
                strip_set_cookie: true,
                cache_key_ignore_query: vec!["utm_*".into()],
                registered_at_ms: Some(5),
            }],
            allow_private_upstreams: true,
        };
        last.save(&saved).unwrap();
        let path = dir.path().join(FILE_NAME);
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        last.save(&saved).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(LastPush::in_dir(dir.path()).load().unwrap(), Some(saved));

        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            LastPush::in_dir(dir.path()).load(),
            Err(LastPushError::Format { .. })
        ));
    }
}
