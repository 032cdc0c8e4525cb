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

/// Write `value` as JSON to `path` atomically ([`write_atomic`]): [`read_json`]'s twin.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Write `bytes` to `path` atomically: a temporary file, fsync, rename, then an fsync of the
/// directory so the rename itself survives a crash. A reader finds the old content or the
/// new, never a mix. For a process's own state: a symbolic link at `path` is replaced by the
/// file, and the file is this process's.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, Replacing::default())
}

/// How [`replace`] treats the file it replaces.
#[derive(Debug, Clone, Copy, Default)]
pub struct Replacing {
    /// The mode the new file is created with (less the umask) from the start, so a key is
    /// never readable by others, not even between its creation and a `chmod`; `None`: the
    /// default.
    pub mode: Option<u32>,
    /// Keep the old file's owner where this process may set it (a renewal run as root into
    /// a service user's files) and replace a symbolic link's target rather than the link:
    /// for files an operator installs and manages (certificates, keys), not for state.
    pub installed: bool,
}

/// Temporaries of a replacement older than this are a killed writer's, and the next
/// replacement of the same file removes them; younger ones may be another writer's at work.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

/// Replace `path` with `bytes` whole, as [`write_atomic`] does, the new file made as `how` says.
/// The temporary is `.<name>.<pid>-<n>-<ns>.tmp` beside it: hidden from globs such as
/// `*.pem`, and unique to the process and the call even across restarts that reuse a pid (the
/// old and the new process of a graceful upgrade may write the same file at once).
pub fn replace(path: &Path, bytes: &[u8], how: Replacing) -> io::Result<()> {
    replace_with(path, how, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes, for a file too large to build in memory first:
/// `write` streams it into the temporary (buffered), and the fsyncs and the rename come after
/// it returns, so a lock it holds while it writes is not held through them.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    replace_with(path, Replacing::default(), write)
}

fn replace_with(
    path: &Path,
    how: Replacing,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let resolved;
    let path = match std::fs::symlink_metadata(path) {
        Ok(m) if how.installed && m.file_type().is_symlink() => {
            resolved = std::fs::canonicalize(path)?;
            resolved.as_path()
        }
        _ => path,
    };
    let owner = how
        .installed
        .then(|| std::fs::metadata(path).ok().map(|m| (m.uid(), m.gid())))
        .flatten();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    remove_stale_temporaries(dir.unwrap_or(Path::new(".")), &name);
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_file_name(format!(".{name}.{}-{n}-{ns}.tmp", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if let Some(mode) = how.mode {
        options.mode(mode);
    }
    let mut file = options.open(&tmp)?;
    let written = {
        if let Some((uid, gid)) = owner {
            // Refused to a user who may not give files away: it then owns the new file, as it
            // could have written the old one only if it were its own or writable to it.
            let _ = std::os::unix::fs::fchown(&file, Some(uid), Some(gid));
        }
        let streamed = {
            let mut buffered = io::BufWriter::new(&mut file);
            write(&mut buffered).and_then(|()| buffered.flush())
        };
        streamed
            .and_then(|()| file.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
    };
    if let Err(e) = written {
        // Ours (created above): not left behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir_of(path)
}

/// Create `dir` if it is missing and prove a file can be written in it (created, written and
/// removed): what a start-up check can say of a data directory without opening what is in it.
pub fn check_writable_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".shadowcdn-check.{}", std::process::id()));
    // Removed only once created here: a file of that name already there is not ours.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    let written = file.write_all(b"check").and_then(|()| file.sync_all());
    drop(file);
    written.and(std::fs::remove_file(&probe))
}

/// Fsync the directory that holds `path`, so a file just created or renamed there keeps its
/// name through a crash (a file's own fsync does not commit its directory entry everywhere).
pub fn sync_dir_of(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => return Ok(()),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Remove the temporaries of `name` in `dir` that a killed writer left ([`STALE_TEMPORARY`]):
/// a key's may hold a private key that has since been replaced.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if !(file.starts_with(&prefix) && file.ends_with(".tmp")) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMPORARY);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporaries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_state_file_is_replaced_whole_and_a_link_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere.json");
        std::fs::write(&target, "theirs").unwrap();
        let path = dir.path().join("state.json");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_atomic(&path, b"ours").unwrap();
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"ours");
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"theirs",
            "not written through"
        );
        assert!(temporaries(dir.path()).is_empty());
    }

    #[test]
    fn a_streamed_file_replaces_the_old_one_only_when_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        write_atomic_with(&path, |w| {
            for i in 0..10_000 {
                write!(w, "{i},")?;
            }
            Ok(())
        })
        .unwrap();
        let whole = std::fs::read_to_string(&path).unwrap();
        assert!(whole.starts_with("0,1,2,") && whole.ends_with("9999,"));
        let failed = write_atomic_with(&path, |w| {
            w.write_all(b"half of it")?;
            Err(io::Error::other("the writer gave up"))
        });
        assert!(failed.is_err());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            whole,
            "left as it was"
        );
        assert!(temporaries(dir.path()).is_empty());
    }

    #[test]
    fn a_killed_writers_temporaries_go_and_a_working_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        let (old, fresh) = (".ca.key.1-0-0.tmp", ".ca.key.2-0-0.tmp");
        for t in [old, fresh] {
            std::fs::write(dir.path().join(t), "half a key").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join(old))
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        let how = Replacing {
            mode: Some(0o600),
            installed: true,
        };
        replace(&path, b"key", how).unwrap();
        assert_eq!(temporaries(dir.path()), vec![fresh.to_string()]);
        assert_eq!(std::fs::read(&path).unwrap(), b"key");
    }
}
