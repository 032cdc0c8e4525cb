//! In-flight fills: bodies being written from the origin, readable while they stream in.
//!
//! pingora's cache lock lets one request fill an object while others wait; with streaming
//! partial writes the waiters start reading as soon as the first chunk lands instead of after
//! the last one. A fill lives here until its body is complete and committed to foyer.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::RwLock;
use pingora_cache::key::CacheKey;
use pingora_cache::storage::{HandleHit, Storage};
use pingora_cache::trace::SpanHandle;
use pingora_error::{Error, ErrorType, Result};
use tokio::sync::watch;

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

/// A body being written.
#[derive(Debug)]
pub(crate) struct Fill {
    pub(crate) id: u64,
    pub(crate) tag: [u8; 8],
    pub(crate) meta: (Bytes, Bytes),
    pub(crate) chunks: RwLock<Vec<Bytes>>,
    pub(crate) state: watch::Sender<FillState>,
    /// Set by a purge that raced the fill: the finished body must not be committed.
    pub(crate) cancelled: AtomicBool,
}

impl Fill {
    pub(crate) fn new(id: u64, meta: (Bytes, Bytes)) -> Arc<Self> {
        Arc::new(Fill {
            id,
            tag: id.to_be_bytes(),
            meta,
            chunks: RwLock::new(Vec::new()),
            state: watch::channel(FillState::Writing).0,
            cancelled: AtomicBool::new(false),
        })
    }

    pub(crate) fn push(&self, data: Bytes) {
        if !data.is_empty() {
            self.chunks.write().push(data);
        }
        // Notify after the chunk is visible so no reader can miss it.
        self.state.send_replace(FillState::Writing);
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

    /// The whole body in one buffer (one copy, at commit time).
    pub(crate) fn body(&self) -> Bytes {
        let chunks = self.chunks.read();
        match chunks.len() {
            0 => Bytes::new(),
            1 => chunks[0].clone(),
            _ => {
                let total = chunks.iter().map(Bytes::len).sum();
                let mut buf = Vec::with_capacity(total);
                for c in chunks.iter() {
                    buf.extend_from_slice(c);
                }
                Bytes::from(buf)
            }
        }
    }
}

/// Reads a fill while it is being written.
pub(crate) struct PartialHit {
    fill: Arc<Fill>,
    next: usize,
    rx: watch::Receiver<FillState>,
}

impl PartialHit {
    pub(crate) fn new(fill: Arc<Fill>) -> Self {
        let rx = fill.state.subscribe();
        PartialHit { fill, next: 0, rx }
    }
}

#[async_trait]
impl HandleHit for PartialHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            // Mark the state seen *before* looking at the chunks: a chunk pushed after this
            // point comes with a notification we have not consumed yet.
            let state = *self.rx.borrow_and_update();
            {
                let chunks = self.fill.chunks.read();
                if self.next < chunks.len() {
                    self.next += 1;
                    return Ok(Some(chunks[self.next - 1].clone()));
                }
            }
            match state {
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

    #[tokio::test]
    async fn partial_reader_follows_writer() {
        let fill = Fill::new(1, (Bytes::new(), Bytes::new()));
        let mut r = PartialHit::new(fill.clone());
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

    #[tokio::test]
    async fn aborted_fill_fails_reader() {
        let fill = Fill::new(1, (Bytes::new(), Bytes::new()));
        let mut r = PartialHit::new(fill.clone());
        fill.push(Bytes::from_static(b"abc"));
        fill.finish(FillState::Aborted);
        assert!(r.read_body().await.unwrap().is_some());
        assert!(r.read_body().await.is_err());
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
