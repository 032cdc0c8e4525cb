//! Small JSON state files, rewritten whole and atomically (the broker's monitor snapshot
//! and pending purges, the edge's last origin push).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Not what this build writes.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// The JSON value at `path`, `None` when there is no file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| FileError::Format {
            path: path.to_path_buf(),
            source,
        })
}

/// Write `bytes` to `path` atomically: a temporary file, fsync, rename, then an fsync of the
/// directory so the rename itself survives a crash. A reader finds the old content or the
/// new, never a mix. See [`replace`] for the owner, links and the temporary file's name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, None)
}

/// [`write_atomic`] with the new file created with `mode` (less the umask) from the start, so
/// a key is never readable by others, not even between its creation and a `chmod`; `None`:
/// the default mode. A file replaced keeps its owner where this process may set it (a
/// renewal run as root into a service user's files), and a symbolic link is followed: its
/// target is replaced, not the link.
pub fn replace(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let resolved;
    let path = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            resolved = std::fs::canonicalize(path)?;
            resolved.as_path()
        }
        _ => path,
    };
    let owner = std::fs::metadata(path).ok().map(|m| (m.uid(), m.gid()));
    // `.<name>.<pid>.<n>.tmp` beside it: hidden from globs such as `*.pem`, and named by
    // process and call, since the old and the new process of a graceful upgrade may write
    // the same file at once and must not share one temporary file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if let Some(mode) = mode {
        options.mode(mode);
    }
    let written = options
        .open(&tmp)
        .and_then(|mut f| {
            if let Some((uid, gid)) = owner {
                // Refused to a user who may not give files away: it then owns the new file,
                // as it could have written the old one only if it were its own or writable
                // to it.
                let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
            }
            f.write_all(bytes).and_then(|()| f.sync_all())
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Not left behind: each write has a name of its own.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}
