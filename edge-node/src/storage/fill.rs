//! In-flight fills: bodies being written from the origin, readable while they stream in.
//!
//! pingora's cache lock lets one request fill an object while others wait; with streaming
//! partial writes the waiters start reading as soon as the first chunk lands instead of after
//! the last one. A fill lives here until its body is complete and committed to foyer.
//!
//! A body that cannot be kept for the cache (it outgrew the object limit while it streamed, or
//! the fills' memory budget was spent) is *passed through*: its readers, already serving
//! clients, still get every byte, but it is never committed, takes no new readers, and drops
//! each chunk once all its readers have it. pingora reads the origin as fast as it comes, so a
//! reader that falls more than a window behind is cut off (its client gets an error) rather
//! than making the edge hold the body for it.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use pingora_cache::key::CacheKey;
use pingora_cache::storage::{HandleHit, Storage};
use pingora_cache::trace::SpanHandle;
use pingora_error::{Error, ErrorType, Result};
use tokio::sync::watch;

use super::ObjectMeta;

/// Progress of a fill as seen by its readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillState {
    /// More chunks may come.
    Writing,
    /// The body is complete.
    Done,
    /// The writer gave up; readers must fail rather than serve a truncated body.
    Aborted,
}

/// The chunks a fill holds.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    /// Index of `list[0]` in the body's chunk sequence: chunks before it were dropped by a
    /// pass-through after every reader had them.
    base: usize,
    list: VecDeque<Bytes>,
    /// Bytes in `list`.
    held: usize,
    /// The body passes through: never committed, no new readers.
    passing: bool,
    /// Committed to the cache: `held` no longer counts against the fill budget.
    committed: bool,
}

/// The read position of a reader a pass-through cut off.
const CUT: usize = usize::MAX;
/// The read position of a reader that has served its whole range.
const DONE: usize = usize::MAX - 1;

/// Whether a reader at `next` still needs chunks.
fn reading(next: usize) -> bool {
    next != CUT && next != DONE
}

/// What a pass-through still holds after a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    /// Bytes not yet read by every remaining reader.
    pub(crate) bytes: usize,
    /// Readers still reading.
    pub(crate) readers: usize,
    /// Readers cut off by this release.
    pub(crate) cut: usize,
}

/// A body being written.
#[derive(Debug)]
pub(crate) struct Fill {
    pub(crate) id: u64,
    pub(crate) tag: [u8; 8],
    pub(crate) meta: ObjectMeta,
    chunks: RwLock<Chunks>,
    pub(crate) state: watch::Sender<FillState>,
    /// Set by a purge that raced the fill: the finished body must not be committed.
    pub(crate) cancelled: AtomicBool,
    /// Next chunk index of each reader, so a pass-through knows what all of them have read;
    /// [`CUT`] for a reader cut off, [`DONE`] for one that has served its range.
    readers: Mutex<Vec<Weak<AtomicUsize>>>,
    /// Bytes held by every fill of the storage, this one's chunks included.
    in_flight: Arc<AtomicUsize>,
}

impl Fill {
    pub(crate) fn new(id: u64, meta: ObjectMeta, in_flight: Arc<AtomicUsize>) -> Arc<Self> {
        Arc::new(Fill {
            id,
            tag: id.to_be_bytes(),
            meta,
            chunks: RwLock::new(Chunks::default()),
            state: watch::channel(FillState::Writing).0,
            cancelled: AtomicBool::new(false),
            readers: Mutex::new(Vec::new()),
            in_flight,
        })
    }

    pub(crate) fn push(&self, data: Bytes) {
        if !data.is_empty() {
            let mut chunks = self.chunks.write();
            chunks.held += data.len();
            self.in_flight.fetch_add(data.len(), Ordering::Relaxed);
            chunks.list.push_back(data);
        }
        // Notify after the chunk is visible so no reader can miss it.
        self.state.send_replace(FillState::Writing);
    }

    /// The body is in the cache now. Its chunks stay readable for the clients still
    /// receiving them (as a hit's client keeps its entry's bytes), but they stop counting
    /// against the fill budget: slow downloads of committed objects must not make every new
    /// fill pass through uncached.
    pub(crate) fn committed(&self) {
        let mut chunks = self.chunks.write();
        if !chunks.committed {
            chunks.committed = true;
            self.in_flight.fetch_sub(chunks.held, Ordering::Relaxed);
        }
    }

    pub(crate) fn finish(&self, state: FillState) {
        self.state.send_replace(state);
    }

    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Stop keeping the body for the cache: from now on it only streams to the readers it has.
    pub(crate) fn pass_through(&self) {
        self.chunks.write().passing = true;
    }

    /// Drop the chunks every live reader has read, first cutting off the slowest readers
    /// while more than `window` bytes would stay held for them.
    pub(crate) fn release_read(&self, window: usize) -> Held {
        let mut chunks = self.chunks.write();
        let mut readers = self.readers.lock();
        let mut cut = 0;
        loop {
            let live: Vec<Arc<AtomicUsize>> = readers
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|next| reading(next.load(Ordering::Acquire)))
                .collect();
            let end = chunks.base + chunks.list.len();
            let slowest = live
                .iter()
                .map(|next| next.load(Ordering::Acquire))
                .min()
                .unwrap_or(end);
            while chunks.base < slowest.min(end) {
                if let Some(c) = chunks.list.pop_front() {
                    chunks.held -= c.len();
                    self.in_flight.fetch_sub(c.len(), Ordering::Relaxed);
                }
                chunks.base += 1;
            }
            if chunks.held <= window || live.is_empty() {
                readers.retain(|r| {
                    r.upgrade()
                        .is_some_and(|n| reading(n.load(Ordering::Acquire)))
                });
                return Held {
                    bytes: chunks.held,
                    readers: live.len(),
                    cut,
                };
            }
            // Readers read under the chunks lock, so none moves while this one holds it.
            for next in live.iter().filter(|n| n.load(Ordering::Acquire) == slowest) {
                next.store(CUT, Ordering::Release);
                cut += 1;
            }
        }
    }

    /// The whole body in one buffer (one copy, at commit time).
    pub(crate) fn body(&self) -> Bytes {
        let chunks = self.chunks.read();
        debug_assert_eq!(chunks.base, 0, "a passed-through fill is never committed");
        match chunks.list.len() {
            0 => Bytes::new(),
            1 => chunks.list[0].clone(),
            _ => {
                let mut buf = Vec::with_capacity(chunks.held);
                for c in chunks.list.iter() {
                    buf.extend_from_slice(c);
                }
                Bytes::from(buf)
            }
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        // The last holder (writer, reader or the fill table) frees the chunks.
        let chunks = self.chunks.get_mut();
        if !chunks.committed {
            self.in_flight.fetch_sub(chunks.held, Ordering::Relaxed);
        }
    }
}

/// Reads a fill while it is being written.
///
/// A single Range can be served from it: the reader walks the chunks as they land, skips
/// those before the range and stops at its end, so a Range request that joins a fill gets its
/// 206 without waiting for the whole body. Multipart ranges read the whole body through
/// pingora's range filter instead: their ranges may go backwards, to chunks a pass-through
/// may already have dropped.
pub(crate) struct PartialHit {
    fill: Arc<Fill>,
    next: Arc<AtomicUsize>,
    rx: watch::Receiver<FillState>,
    /// Body offset of chunk `next`.
    pos: usize,
    /// The byte range to serve, end exclusive; the whole body by default.
    range: (usize, usize),
}

impl PartialHit {
    /// A reader from the first chunk, unless the fill passes through (it may have dropped it).
    pub(crate) fn new(fill: Arc<Fill>) -> Option<Self> {
        let next = Arc::new(AtomicUsize::new(0));
        {
            // Registered under the chunks lock, so no release can miss this reader.
            let chunks = fill.chunks.read();
            if chunks.passing {
                return None;
            }
            fill.readers.lock().push(Arc::downgrade(&next));
        }
        let rx = fill.state.subscribe();
        Some(PartialHit {
            fill,
            next,
            rx,
            pos: 0,
            range: (0, usize::MAX),
        })
    }
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        let (start, end) = self.range;
        loop {
            if self.pos >= end {
                return Ok(None);
            }
            // Mark the state seen *before* looking at the chunks: a chunk pushed after this
            // point comes with a notification we have not consumed yet.
            let state = *self.rx.borrow_and_update();
            {
                let chunks = self.fill.chunks.read();
                let next = self.next.load(Ordering::Acquire);
                if next == CUT {
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "fell too far behind a body passing through the cache",
                    );
                }
                // A release never drops what a registered reader has not read.
                let Some(i) = next.checked_sub(chunks.base) else {
                    return Error::e_explain(ErrorType::InternalError, "fill chunk dropped unread");
                };
                if let Some(c) = chunks.list.get(i) {
                    let at = self.pos;
                    self.pos += c.len();
                    // Once the range's last byte is out the reader is served: a pass-through
                    // then neither holds chunks for it nor counts it as a client that fell
                    // behind (pingora keeps the reader until the fill ends).
                    let after = if self.pos >= end { DONE } else { next + 1 };
                    self.next.store(after, Ordering::Release);
                    let (lo, hi) = (start.max(at), end.min(self.pos));
                    if lo < hi {
                        return Ok(Some(c.slice(lo - at..hi - at)));
                    }
                    continue;
                }
            }
            match state {
                FillState::Done if end != usize::MAX => {
                    // The header promised the range from the origin's Content-Length.
                    return Error::e_explain(
                        ErrorType::InternalError,
                        format!("body ended at {} before the range's end {end}", self.pos),
                    );
                }
                FillState::Done => return Ok(None),
                FillState::Aborted => {
                    return Error::e_explain(ErrorType::InternalError, "cache fill aborted")
                }
                FillState::Writing => {
                    if self.rx.changed().await.is_err() {
                        return Error::e_explain(ErrorType::InternalError, "cache fill dropped");
                    }
                }
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn can_seek_multipart(&self) -> bool {
        false
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let end = end.unwrap_or(usize::MAX);
        if start > end || start < self.pos || !reading(self.next.load(Ordering::Acquire)) {
            return Error::e_explain(
                ErrorType::InternalError,
                format!(
                    "seek {start}..{end} in a body being filled, read up to {}",
                    self.pos
                ),
            );
        }
        self.range = (start, end);
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Serves a complete body, with seeking for single and multipart ranges.
pub(crate) struct CompleteHit {
    body: Bytes,
    start: usize,
    end: usize,
    done: bool,
}

impl CompleteHit {
    pub(crate) fn new(body: Bytes) -> Self {
        let end = body.len();
        CompleteHit {
            body,
            start: 0,
            end,
            done: false,
        }
    }
}

#[async_trait]
impl HandleHit for CompleteHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        Ok(Some(self.body.slice(self.start..self.end)))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let end = end.unwrap_or(self.body.len());
        if start > end || end > self.body.len() {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek {start}..{end} outside body of {}", self.body.len()),
            );
        }
        self.start = start;
        self.end = end;
        self.done = false;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ObjectMeta {
        let now = std::time::SystemTime::now();
        let header = pingora_http::ResponseHeader::build(200, None).unwrap();
        ObjectMeta::of(&pingora_cache::CacheMeta::new(now, now, 0, 0, header)).unwrap()
    }

    #[tokio::test]
    async fn partial_reader_follows_writer() {
        let fill = Fill::new(1, meta(), Arc::default());
        let mut r = PartialHit::new(fill.clone()).unwrap();
        let w = fill.clone();
        let t = tokio::spawn(async move {
            for i in 0..50u8 {
                w.push(Bytes::from(vec![i; 10]));
                tokio::task::yield_now().await;
            }
            w.finish(FillState::Done);
        });
        let mut got = Vec::new();
        while let Some(c) = r.read_body().await.unwrap() {
            got.extend_from_slice(&c);
        }
        t.await.unwrap();
        assert_eq!(got.len(), 500);
        assert_eq!(fill.body().len(), 500);
    }

    async fn read_all(r: &mut PartialHit) -> Result<Vec<u8>> {
        let mut got = Vec::new();
        while let Some(c) = r.read_body().await? {
            got.extend_from_slice(&c);
        }
        Ok(got)
    }

    #[tokio::test]
    async fn a_reader_serves_a_range_as_the_chunks_arrive() {
        let body: Vec<u8> = (0..100u8).collect();
        // A range inside one chunk, across chunks, and from a chunk boundary to the end.
        for (start, end) in [(3, 7), (8, 35), (20, 100)] {
            let fill = Fill::new(1, meta(), Arc::default());
            let mut r = PartialHit::new(fill.clone()).unwrap();
            r.seek(start, Some(end)).unwrap();
            let chunks: Vec<Bytes> = body.chunks(10).map(Bytes::copy_from_slice).collect();
            let writer = tokio::spawn(async move {
                for c in chunks {
                    fill.push(c);
                    tokio::task::yield_now().await;
                }
            });
            assert_eq!(read_all(&mut r).await.unwrap(), &body[start..end]);
            writer.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_range_ends_without_waiting_for_the_rest_of_the_body() {
        let fill = Fill::new(1, meta(), Arc::default());
        let mut r = PartialHit::new(fill.clone()).unwrap();
        r.seek(2, Some(10)).unwrap();
        fill.push(Bytes::from_static(b"0123456789"));
        // The fill is still writing; the range is complete all the same.
        assert_eq!(read_all(&mut r).await.unwrap(), b"23456789");
    }

    #[tokio::test]
    async fn a_body_shorter_than_the_range_fails_the_reader() {
        let fill = Fill::new(1, meta(), Arc::default());
        let mut r = PartialHit::new(fill.clone()).unwrap();
        r.seek(5, Some(50)).unwrap();
        fill.push(Bytes::from_static(b"0123456789"));
        fill.finish(FillState::Done);
        assert!(read_all(&mut r).await.is_err());
    }

    #[tokio::test]
    async fn a_reader_done_with_its_range_holds_nothing_back_and_is_not_cut() {
        let fill = Fill::new(1, meta(), Arc::default());
        let mut ranged = PartialHit::new(fill.clone()).unwrap();
        let mut whole = PartialHit::new(fill.clone()).unwrap();
        ranged.seek(0, Some(10)).unwrap();
        fill.push(Bytes::from(vec![0; 10]));
        assert_eq!(read_all(&mut ranged).await.unwrap(), vec![0; 10]);
        fill.pass_through();
        for i in 1..4u8 {
            fill.push(Bytes::from(vec![i; 10]));
        }
        for _ in 0..4 {
            whole.read_body().await.unwrap().unwrap();
        }
        // The ranged reader stays registered (pingora keeps it until the fill ends), but
        // what the other reader has read goes, and nobody is cut off.
        let held = fill.release_read(5);
        assert_eq!((held.bytes, held.readers, held.cut), (0, 1, 0));
        assert!(ranged.seek(20, Some(30)).is_err(), "its range was served");
    }

    #[tokio::test]
    async fn a_reader_does_not_seek_back_or_do_multipart() {
        let fill = Fill::new(1, meta(), Arc::default());
        let mut r = PartialHit::new(fill.clone()).unwrap();
        assert!(r.can_seek() && !r.can_seek_multipart());
        fill.push(Bytes::from_static(b"0123456789"));
        assert_eq!(r.read_body().await.unwrap().unwrap(), &b"0123456789"[..]);
        assert!(r.seek(5, Some(8)).is_err());
        assert!(r.seek(12, Some(11)).is_err());
        r.seek(12, None).unwrap();
        fill.push(Bytes::from_static(b"abcdef"));
        fill.finish(FillState::Done);
        assert_eq!(read_all(&mut r).await.unwrap(), b"cdef");
    }

    #[tokio::test]
    async fn aborted_fill_fails_reader() {
        let fill = Fill::new(1, meta(), Arc::default());
        let mut r = PartialHit::new(fill.clone()).unwrap();
        fill.push(Bytes::from_static(b"abc"));
        fill.finish(FillState::Aborted);
        assert!(r.read_body().await.unwrap().is_some());
        assert!(r.read_body().await.is_err());
    }

    #[tokio::test]
    async fn a_pass_through_drops_what_every_reader_has_read() {
        let fill = Fill::new(1, meta(), Arc::default());
        let mut fast = PartialHit::new(fill.clone()).unwrap();
        let mut slow = PartialHit::new(fill.clone()).unwrap();
        for i in 0..4u8 {
            fill.push(Bytes::from(vec![i; 10]));
        }
        fill.pass_through();
        assert!(PartialHit::new(fill.clone()).is_none(), "no new readers");
        for _ in 0..3 {
            fast.read_body().await.unwrap().unwrap();
        }
        slow.read_body().await.unwrap().unwrap();
        // The slow reader has one chunk: the other three stay.
        let held = |bytes, readers, cut| Held {
            bytes,
            readers,
            cut,
        };
        assert_eq!(fill.release_read(100), held(30, 2, 0));
        drop(slow);
        // Only the fast one is left, three chunks in.
        assert_eq!(fill.release_read(100), held(10, 1, 0));
        assert_eq!(fast.read_body().await.unwrap().unwrap()[0], 3);
        fill.push(Bytes::from(vec![4; 10]));
        fill.finish(FillState::Done);
        assert_eq!(fast.read_body().await.unwrap().unwrap()[0], 4);
        assert!(fast.read_body().await.unwrap().is_none());
        drop(fast);
        assert_eq!(
            fill.release_read(100),
            held(0, 0, 0),
            "no readers: nothing held"
        );
    }

    #[tokio::test]
    async fn a_committed_fill_stops_counting_while_a_slow_reader_still_reads_it() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let fill = Fill::new(1, meta(), in_flight.clone());
        let mut slow = PartialHit::new(fill.clone()).unwrap();
        fill.push(Bytes::from(vec![1; 10]));
        fill.push(Bytes::from(vec![2; 10]));
        fill.finish(FillState::Done);
        assert_eq!(in_flight.load(Ordering::Relaxed), 20);
        fill.committed();
        fill.committed();
        assert_eq!(in_flight.load(Ordering::Relaxed), 0, "counted out once");
        drop(fill);
        assert_eq!(slow.read_body().await.unwrap().unwrap()[0], 1);
        assert_eq!(slow.read_body().await.unwrap().unwrap()[0], 2);
        assert!(slow.read_body().await.unwrap().is_none());
        drop(slow);
        assert_eq!(
            in_flight.load(Ordering::Relaxed),
            0,
            "not subtracted again on drop"
        );
    }

    #[tokio::test]
    async fn a_reader_too_far_behind_is_cut_off_alone() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let fill = Fill::new(1, meta(), in_flight.clone());
        let mut fast = PartialHit::new(fill.clone()).unwrap();
        let mut stuck = PartialHit::new(fill.clone()).unwrap();
        fill.pass_through();
        for i in 0..5u8 {
            fill.push(Bytes::from(vec![i; 10]));
            fast.read_body().await.unwrap().unwrap();
        }
        // 50 bytes wait for the stuck reader; a 20-byte window cuts it off, not the fill.
        let held = fill.release_read(20);
        assert_eq!((held.bytes, held.readers, held.cut), (0, 1, 1));
        assert_eq!(in_flight.load(Ordering::Relaxed), 0);
        let err = stuck.read_body().await.unwrap_err();
        assert!(err.to_string().contains("behind"), "{err}");
        fill.push(Bytes::from(vec![5; 10]));
        fill.finish(FillState::Done);
        assert_eq!(fast.read_body().await.unwrap().unwrap()[0], 5);
        assert!(fast.read_body().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn complete_hit_seeks() {
        let mut h = CompleteHit::new(Bytes::from_static(b"0123456789"));
        h.seek(2, Some(5)).unwrap();
        assert_eq!(
            h.read_body().await.unwrap().unwrap(),
            Bytes::from_static(b"234")
        );
        assert!(h.read_body().await.unwrap().is_none());
        h.seek(8, None).unwrap();
        assert_eq!(
            h.read_body().await.unwrap().unwrap(),
            Bytes::from_static(b"89")
        );
        assert!(h.seek(5, Some(11)).is_err());
    }
}
