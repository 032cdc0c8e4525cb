//! Access logs: one JSON object per request, written off the request path.
//!
//! A request's phase serializes its line and hands it to a bounded queue; one writer thread
//! appends what it finds there to the log and flushes after each batch, so a busy server pays
//! one buffered write per batch rather than one per request, and a slow disk costs dropped
//! lines (counted) rather than stalled requests. The file is reopened when it is renamed or
//! removed (logrotate's default `create` mode works, no signal needed); the writer drains the
//! queue when the server stops, so the last requests are logged too.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use serde::Serialize;

/// Lines the queue holds before new ones are dropped.
const QUEUE_LINES: usize = 65_536;
/// How often the writer checks that the path still names the file it writes.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// Where access lines go: a file path, or `stdout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output (a container's log collector).
    Stdout,
    /// A file, appended to and created if missing.
    File(PathBuf),
}

impl Target {
    /// `"stdout"` or a path.
    pub fn parse(s: &str) -> Target {
        if s == "stdout" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(s))
        }
    }
}

/// The request side: queues serialized lines.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    dropped: IntCounter,
}

/// The writer thread.
pub struct AccessLogWriter {
    handle: JoinHandle<()>,
}

impl AccessLogWriter {
    /// Wait, up to `timeout`, for the writer to write what is queued and stop: it stops once
    /// every [`AccessLog`] handle is gone (the server dropped its services). Lines are written
    /// as they come, so a handle that outlives the server loses nothing already queued.
    pub fn finish(self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.handle.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Open `target` (a file is created if missing) and start the writer. `dropped` counts lines
/// lost to a full queue or a failed write.
pub fn open(target: &Target, dropped: IntCounter) -> io::Result<(AccessLog, AccessLogWriter)> {
    let sink = Sink::open(target)?;
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    let lost = dropped.clone();
    let handle = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_lines(sink, rx, lost))?;
    Ok((AccessLog { tx, dropped }, AccessLogWriter { handle }))
}

impl AccessLog {
    /// Queue one line; never blocks.
    pub fn log(&self, entry: &impl Serialize) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(l) => l,
            Err(_) => {
                self.dropped.inc();
                return;
            }
        };
        line.push(b'\n');
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.dropped.inc();
        }
    }
}

/// Milliseconds since the Unix epoch, the lines' time stamp.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File {
        path: PathBuf,
        inode: u64,
        out: BufWriter<File>,
    },
}

impl Sink {
    fn open(target: &Target) -> io::Result<Sink> {
        Ok(match target {
            Target::Stdout => Sink::Stdout(BufWriter::new(io::stdout())),
            Target::File(path) => {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                Sink::File {
                    inode: file.metadata()?.ino(),
                    path: path.clone(),
                    out: BufWriter::new(file),
                }
            }
        })
    }

    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File { out, .. } => out,
        }
    }

    /// Reopen the file if its path now names another file or none (rotated away).
    fn follow_rotation(&mut self) {
        if let Sink::File { path, inode, out } = self {
            let moved = std::fs::metadata(&*path).map_or(true, |m| m.ino() != *inode);
            if moved {
                let _ = out.flush();
                match Sink::open(&Target::File(path.clone())) {
                    Ok(fresh) => *self = fresh,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot reopen the access log")
                    }
                }
            }
        }
    }
}

fn write_lines(mut sink: Sink, rx: Receiver<Vec<u8>>, lost: IntCounter) {
    let mut checked = std::time::Instant::now();
    loop {
        let first = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if checked.elapsed() >= REOPEN_CHECK {
            sink.follow_rotation();
            checked = std::time::Instant::now();
        }
        for line in first.into_iter().chain(rx.try_iter()) {
            if sink.out().write_all(&line).is_err() {
                lost.inc();
            }
        }
        if let Err(e) = sink.out().flush() {
            tracing::warn!(error = %e, "access log write failed");
        }
    }
    let _ = sink.out().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Line {
        n: u32,
    }

    #[test]
    fn lines_reach_the_file_across_a_rotation_and_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("dropped", "lines dropped").unwrap();
        let (log, writer) = open(&Target::File(path.clone()), dropped.clone()).unwrap();
        log.log(&Line { n: 1 });
        // Rotated away (as logrotate renames it): the next lines go to a new file.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path)
            .unwrap_or_default()
            .is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "first line not written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        std::thread::sleep(REOPEN_CHECK + Duration::from_millis(200));
        log.log(&Line { n: 2 });
        std::thread::sleep(REOPEN_CHECK + Duration::from_millis(200));
        log.log(&Line { n: 3 });
        drop(log);
        writer.finish(Duration::from_secs(5));
        let old = std::fs::read_to_string(dir.path().join("access.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.starts_with("{\"n\":1}\n"), "{old:?}");
        assert!(new.ends_with("{\"n\":3}\n"), "{new:?}");
        assert_eq!(
            old.lines().count() + new.lines().count(),
            3,
            "{old:?} {new:?}"
        );
        assert_eq!(dropped.get(), 0);
    }
}
