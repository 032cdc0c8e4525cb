//! Access logs: one JSON object per request, written off the request path.
//!
//! A request's phase serializes its line into a bounded lock-free queue and returns: no lock,
//! no system call, no wake-up of another thread (on a small VM a cross-thread wake-up per request
//! costs as much as the rest of the line). One writer thread wakes every [`TICK`], appends what
//! the queue holds to the log and flushes, so a busy server pays a few large writes a second,
//! and a slow disk costs dropped lines (counted) rather than stalled requests. The file is
//! reopened when it is renamed or removed (logrotate's default `create` mode works, no signal
//! needed); the server's drain tells the writer to write out the queue and stop
//! ([`AccessLogWriter::finish`]), so the last requests are logged too.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;
use prometheus::IntCounter;
use serde::Serialize;

/// Lines the queue holds before new ones are dropped (about a second of a busy edge).
const QUEUE_LINES: usize = 131_072;
/// How often the writer empties the queue: lines reach the file at most this late.
const TICK: Duration = Duration::from_millis(50);
/// How often the writer checks that the path still names the file it writes.
const REOPEN_CHECK: Duration = Duration::from_secs(1);
/// Room a line is serialized into without growing (most lines are shorter).
const LINE_CAPACITY: usize = 320;
/// Bytes the writer gathers into one write: a full queue goes out in pieces of this, so the
/// writer's buffer stays small and a failed write loses (and counts) one piece.
const BATCH_BYTES: usize = 1 << 20;

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
    queue: Arc<ArrayQueue<Vec<u8>>>,
    dropped: IntCounter,
    /// Set once the writer was told to stop: later lines have no one to write them.
    stop: Arc<AtomicBool>,
    /// Lines between their check of `stop` and their push: the writer waits for them before
    /// its last drain, so a line is either written or counted, never silently left queued.
    pushing: Arc<AtomicUsize>,
}

/// Longest request method, target or host a line carries (pingora accepts 1 MiB of headers,
/// and any token as a method): longer ones are cut, so the queue's memory stays bounded
/// (under a GiB at the very worst, a full queue of lines with all three at the limit).
pub const MAX_FIELD_BYTES: usize = 2048;

/// `s` cut to at most [`MAX_FIELD_BYTES`], at a character boundary.
pub fn clip(s: &str) -> &str {
    if s.len() <= MAX_FIELD_BYTES {
        return s;
    }
    let mut end = MAX_FIELD_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The writer thread.
pub struct AccessLogWriter {
    handle: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl AccessLogWriter {
    /// Write what is queued and stop the writer, waiting up to `timeout`: called as the
    /// server's drain ends; a line logged later is counted as dropped.
    pub fn finish(self, timeout: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.thread().unpark();
        let deadline = Instant::now() + timeout;
        while !self.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Open `target` (a file is created if missing) and start the writer. `dropped` counts lines
/// lost to a full queue or a failed write.
pub fn open(target: &Target, dropped: IntCounter) -> io::Result<(AccessLog, AccessLogWriter)> {
    let sink = Sink::open(target)?;
    let queue = Arc::new(ArrayQueue::new(QUEUE_LINES));
    let stop = Arc::new(AtomicBool::new(false));
    let pushing = Arc::new(AtomicUsize::new(0));
    let (shared, lost, stopping, pushers) = (
        queue.clone(),
        dropped.clone(),
        stop.clone(),
        pushing.clone(),
    );
    let handle = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_lines(sink, shared, lost, &stopping, &pushers))?;
    let log = AccessLog {
        queue,
        dropped,
        stop: stop.clone(),
        pushing,
    };
    Ok((log, AccessLogWriter { handle, stop }))
}

impl AccessLog {
    /// Queue one line; never blocks.
    pub fn log(&self, entry: &impl Serialize) {
        if self.stop.load(Ordering::Acquire) {
            self.dropped.inc();
            return;
        }
        let mut line = Vec::with_capacity(LINE_CAPACITY);
        if serde_json::to_writer(&mut line, entry).is_err() {
            self.dropped.inc();
            return;
        }
        line.push(b'\n');
        // Announced before the second look at `stop` (both sequentially consistent): a
        // writer that saw no line pushing after it was told to stop drains after every line
        // that saw `stop` unset.
        self.pushing.fetch_add(1, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) || self.queue.push(line).is_err() {
            self.dropped.inc();
        }
        self.pushing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The fields every access line has, edge or broker, taken from the finished request.
#[derive(Serialize)]
pub struct RequestFields<'a> {
    /// Milliseconds since the Unix epoch when the request ended.
    pub time_ms: u64,
    /// The client's address (none for a unix-socket peer).
    pub client: Option<std::net::IpAddr>,
    /// Request method.
    pub method: &'a str,
    /// Host asked for, cut to [`MAX_FIELD_BYTES`].
    pub host: Option<&'a str>,
    /// Path and query, cut to [`MAX_FIELD_BYTES`].
    pub target: &'a str,
    /// Status sent (0: none was).
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: usize,
    /// From the request's start until its end.
    pub duration_ms: f64,
}

impl<'a> RequestFields<'a> {
    /// The fields of `session`'s request, which started at `started`.
    pub fn of(session: &'a pingora_proxy::Session, started: Instant) -> Self {
        let req = session.req_header();
        RequestFields {
            time_ms: now_ms(),
            client: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            method: clip(req.method.as_str()),
            host: crate::proxy::request_host(req).map(clip),
            target: clip(req.uri.path_and_query().map_or("", |p| p.as_str())),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            bytes: session.body_bytes_sent(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    }
}

/// Open the configured target, if any: the handle for the proxy and the writer for the drain.
pub fn open_configured(
    target: Option<&str>,
    dropped: IntCounter,
) -> io::Result<Option<(AccessLog, AccessLogWriter)>> {
    target.map(|t| open(&Target::parse(t), dropped)).transpose()
}

/// Whether the log `target` names can be opened for appending (a file is created if missing,
/// as a start would): what a start-up check can say of it without starting its writer.
pub fn check_configured(target: Option<&str>) -> io::Result<()> {
    match target.map(Target::parse) {
        Some(Target::File(path)) => std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map(drop),
        Some(Target::Stdout) | None => Ok(()),
    }
}

/// Milliseconds since the Unix epoch, the lines' time stamp.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where lines go. Unbuffered: the writer batches each pass's lines itself, so a write that
/// fails loses (and counts) that batch, never leaving bytes behind to be sent again.
enum Sink {
    Stdout(io::Stdout),
    File {
        path: PathBuf,
        inode: u64,
        out: File,
        /// The path was rotated away and could not be opened again: lines written now would
        /// go to a removed file, so they are counted as lost instead.
        detached: bool,
    },
}

impl Sink {
    fn open(target: &Target) -> io::Result<Sink> {
        Ok(match target {
            Target::Stdout => Sink::Stdout(io::stdout()),
            Target::File(path) => {
                let file = OpenOptions::new().create(true).append(true).open(path)?;
                Sink::File {
                    inode: file.metadata()?.ino(),
                    path: path.clone(),
                    out: file,
                    detached: false,
                }
            }
        })
    }

    /// Where lines go now; `None` while detached.
    fn out(&mut self) -> Option<&mut dyn Write> {
        match self {
            Sink::Stdout(w) => Some(w),
            Sink::File { detached: true, .. } => None,
            Sink::File { out, .. } => Some(out),
        }
    }

    /// Reopen the file if its path now names another file or none (rotated away).
    fn follow_rotation(&mut self) {
        if let Sink::File {
            path,
            inode,
            detached,
            ..
        } = self
        {
            let moved = std::fs::metadata(&*path).map_or(true, |m| m.ino() != *inode);
            if moved {
                match Sink::open(&Target::File(path.clone())) {
                    Ok(fresh) => {
                        if *detached {
                            tracing::info!(path = %path.display(), "access log reopened");
                        }
                        *self = fresh;
                    }
                    Err(e) if !*detached => {
                        *detached = true;
                        tracing::error!(path = %path.display(), error = %e, "access log rotated away and cannot be reopened: lines are dropped until it can");
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

fn write_lines(
    mut sink: Sink,
    queue: Arc<ArrayQueue<Vec<u8>>>,
    lost: IntCounter,
    stop: &AtomicBool,
    pushing: &AtomicUsize,
) {
    let mut checked = Instant::now();
    let mut batch = Vec::with_capacity(BATCH_BYTES + LINE_CAPACITY);
    // A write that failed part-way may have left half a line: the next starts a new one.
    let mut torn = false;
    loop {
        // Told to stop: once no line is between its check and its push, write what is
        // left, then stop.
        let stopping = stop.load(Ordering::SeqCst);
        let last = stopping && pushing.load(Ordering::SeqCst) == 0;
        if checked.elapsed() >= REOPEN_CHECK {
            sink.follow_rotation();
            checked = Instant::now();
        }
        loop {
            batch.clear();
            let mut lines = 0;
            while batch.len() < BATCH_BYTES {
                let Some(line) = queue.pop() else { break };
                batch.extend_from_slice(&line);
                lines += 1;
            }
            if lines == 0 {
                break;
            }
            let written = sink.out().map(|out| {
                let start: &[u8] = if torn { b"\n" } else { b"" };
                out.write_all(start)
                    .and_then(|()| out.write_all(&batch))
                    .and_then(|()| out.flush())
            });
            match written {
                Some(Ok(())) => torn = false,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, lines, "access log write failed: lines dropped");
                    lost.inc_by(lines);
                    torn = true;
                }
                None => lost.inc_by(lines),
            }
        }
        if last {
            break;
        }
        if stopping {
            std::thread::yield_now();
        } else {
            std::thread::park_timeout(TICK);
        }
    }
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

    #[test]
    fn lines_with_nowhere_to_go_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("access.log");
        let dropped = IntCounter::new("dropped", "lines dropped").unwrap();
        let (log, writer) = open(&Target::File(path.clone()), dropped.clone()).unwrap();
        // The log's directory goes away: the file cannot be created again.
        std::fs::remove_dir_all(&sub).unwrap();
        std::thread::sleep(REOPEN_CHECK + Duration::from_millis(200));
        log.log(&Line { n: 1 });
        std::thread::sleep(TICK * 4);
        assert_eq!(dropped.get(), 1);
        // After the writer finished, a late line is counted too.
        writer.finish(Duration::from_secs(5));
        log.log(&Line { n: 2 });
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn every_line_logged_across_the_stop_is_written_or_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = IntCounter::new("dropped", "lines dropped").unwrap();
        let (log, writer) = open(&Target::File(path.clone()), dropped.clone()).unwrap();
        let go = Arc::new(AtomicBool::new(true));
        let loggers: Vec<_> = (0..4)
            .map(|_| {
                let (log, go) = (log.clone(), go.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while go.load(Ordering::Relaxed) {
                        log.log(&Line { n: n as u32 });
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(TICK * 2);
        writer.finish(Duration::from_secs(10));
        std::thread::sleep(TICK);
        go.store(false, Ordering::Relaxed);
        let sent: u64 = loggers.into_iter().map(|t| t.join().unwrap()).sum();
        let written = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert!(
            written > 0 && dropped.get() > 0,
            "{written} {}",
            dropped.get()
        );
        assert_eq!(written + dropped.get(), sent);
    }

    #[test]
    fn lines_a_failed_write_loses_are_counted() {
        let dropped = IntCounter::new("dropped", "lines dropped").unwrap();
        let full = PathBuf::from("/dev/full");
        let (log, writer) = open(&Target::File(full), dropped.clone()).unwrap();
        for n in 0..10 {
            log.log(&Line { n });
        }
        writer.finish(Duration::from_secs(5));
        assert_eq!(dropped.get(), 10);
    }

    #[test]
    fn long_fields_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_FIELD_BYTES);
        let cut = clip(&long);
        assert!(cut.len() <= MAX_FIELD_BYTES && cut.len() >= MAX_FIELD_BYTES - 1);
        assert_eq!(clip("/short?q"), "/short?q");
    }
}
