//! The last origin table the broker pushed, kept on disk.
//!
//! Pushed rows live in memory, and the broker pushes every few seconds; without this file a
//! restarted edge would answer every pushed host with 404 `unknown_host` until that next
//! push (or for as long as the broker is down). The edge loads the file at start and applies
//! it as a push. It is rewritten, atomically, only when a push changes it.

use std::io;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::OriginEntry;
use crate::durable::{read_json, write_atomic, FileError};

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
    pub fn load(&self) -> Result<Option<Saved>, FileError> {
        let saved: Option<Saved> = read_json(&self.path)?;
        if let Some(saved) = &saved {
            // What `save` would write for it, so that the broker's first push, the same
            // table, is not written again.
            *self.written.lock() = serde_json::to_vec(saved).unwrap_or_default();
        }
        Ok(saved)
    }

    /// Write `saved` unless it is what the file already holds ([`write_atomic`]).
    pub fn save(&self, saved: &Saved) -> io::Result<()> {
        let bytes = serde_json::to_vec(saved).map_err(io::Error::other)?;
        let mut written = self.written.lock();
        if *written == bytes {
            return Ok(());
        }
        write_atomic(&self.path, &bytes)?;
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
            Err(FileError::Format { .. })
        ));
    }
}
