//! A GPU RX pool as the emulated NIC writes it. A real NIC DMAs payload
//! into GPU memory; the software NIC lands it in a pinned host mirror of the
//! pool, and the dirty span is copied to the GPU when a reader asks for the
//! landed bytes ([`GpuMirror::readers_stream`]): the copy is queued on the
//! mirror's stream, which the reader queues its own work on, so nobody
//! waits for it on the CPU and several receives share one copy.
//!
//! The mirror starts as a copy of the GPU pool and every write to the pool
//! goes through it, so mirror and GPU agree outside the dirty span: a span
//! may be copied whole, gaps included, without clobbering anything. That
//! holds while this mirror is the only writer of the pool (the daemon
//! exports the pool and never writes it). A page's mirror bytes are
//! rewritten only once its token came back, that is after the work that
//! read the page finished, and that work was queued after the page's copy:
//! so no queued copy still reads bytes the NIC overwrites, except those of
//! gaps, whose late copy the next flush redoes before anyone reads them.

use std::sync::Mutex;

use super::mem::{PinnedBuffer, Stream};
use super::unpack::Frag;
use super::vmm::MappedRange;
use super::{CudaError, Result};

/// Writes further apart than this are copied separately rather than as one
/// span with the gap (next-fit grants are mostly adjacent; a wrap is not).
const MERGE_GAP: usize = 64 << 10;

/// A GPU pool mapping, its pinned host mirror and the dirty span.
#[derive(Debug)]
pub struct GpuMirror {
    mapping: MappedRange,
    host: PinnedBuffer,
    stream: Stream,
    /// Copies of a few ranges for a host reader, who waits for them: they
    /// do not queue behind the span copies and kernels on `stream`.
    side: Stream,
    /// Written and not yet copied: one span (lazily flushed by readers
    /// holding `&self`).
    dirty: Mutex<Option<(usize, usize)>>,
}

impl GpuMirror {
    /// Mirrors `mapping` (one device-to-host copy of the whole pool).
    pub fn new(mapping: MappedRange) -> Result<Self> {
        let ctx = mapping.context();
        let host = PinnedBuffer::alloc(ctx, mapping.size())?;
        let stream = Stream::new(ctx)?;
        // SAFETY: host and mapping both span mapping.size() bytes and
        // outlive the sync below.
        unsafe { stream.dtoh(host.as_ptr(), mapping.ptr(), mapping.size())? };
        stream.sync()?;
        Ok(GpuMirror {
            mapping,
            host,
            side: Stream::new(ctx)?,
            stream,
            dirty: Mutex::new(None),
        })
    }

    /// The mirror's first byte: where the NIC lands payload. Valid for
    /// [`GpuMirror::len`] bytes, initialised, for the mirror's life.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// Pool bytes.
    pub fn len(&self) -> usize {
        self.mapping.size()
    }

    /// Whether the pool is empty (never: mappings are at least a granule).
    pub fn is_empty(&self) -> bool {
        self.mapping.size() == 0
    }

    /// The GPU pool, for kernels that read it.
    pub fn mapping(&self) -> &MappedRange {
        &self.mapping
    }

    /// Records that `offset..offset + len` of the mirror was written.
    pub fn mark(&mut self, offset: usize, len: usize) -> Result<()> {
        let end = self.end_of(offset, len)?;
        if self.far_from_dirty(offset, end) {
            self.flush()?;
        }
        let dirty = self.dirty.get_mut().unwrap_or_else(|p| p.into_inner());
        *dirty = Some(match *dirty {
            Some((lo, hi)) => (lo.min(offset), hi.max(end)),
            None => (offset, end),
        });
        Ok(())
    }

    /// Records that `offset..end` of the mirror is about to be written (by
    /// one read into several ranges of it), as one span whatever lies
    /// between: marking the ranges one by one could flush an earlier one
    /// before the read filled it.
    pub fn mark_ahead(&mut self, offset: usize, end: usize) -> Result<()> {
        if end <= offset {
            return Ok(());
        }
        if self.far_from_dirty(offset, end) {
            // Only bytes written already are flushed here.
            self.flush()?;
        }
        self.mark(offset, end - offset)
    }

    /// The end of `offset..offset + len`, which must lie in the pool.
    fn end_of(&self, offset: usize, len: usize) -> Result<usize> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                CudaError::InvalidArgument(format!(
                    "bytes {offset}+{len} outside the {}-byte GPU pool",
                    self.len()
                ))
            })
    }

    fn far_from_dirty(&mut self, offset: usize, end: usize) -> bool {
        let dirty = self.dirty.get_mut().unwrap_or_else(|p| p.into_inner());
        dirty.is_some_and(|(lo, hi)| {
            offset > hi.saturating_add(MERGE_GAP) || end.saturating_add(MERGE_GAP) < lo
        })
    }

    /// Queues the copy of the dirty span to the GPU on the mirror's stream.
    pub fn flush(&self) -> Result<()> {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let Some((lo, hi)) = dirty.take() else {
            return Ok(());
        };
        self.stream.context().make_current()?;
        // SAFETY: lo..hi lies in both the mirror and the mapping (checked in
        // mark); its pages are not rewritten before the work reading them,
        // queued after this copy, finished (module docs).
        let queued = unsafe {
            self.stream.htod(
                self.mapping.ptr() + lo as u64,
                self.host.as_ptr().add(lo),
                hi - lo,
            )
        };
        if queued.is_err() {
            *dirty = Some((lo, hi));
        }
        queued
    }

    /// Copies the source ranges of `rows` to the GPU on a stream of their
    /// own and returns it: work queued next on it sees those bytes, without
    /// waiting for the span copies and kernels queued on the readers'
    /// stream. The ranges stay dirty (a later span copy repeats them).
    pub fn rows_stream(&self, rows: &[Frag]) -> Result<&Stream> {
        self.side.context().make_current()?;
        for r in rows {
            self.end_of(r.src as usize, r.len as usize)?;
            // SAFETY: the range lies in both the mirror and the mapping
            // (checked above); the reader waits on `side` before the pages
            // can go back to the NIC (module docs).
            unsafe {
                self.side.htod(
                    self.mapping.ptr() + r.src,
                    self.host.as_ptr().add(r.src as usize),
                    r.len as usize,
                )?
            };
        }
        Ok(&self.side)
    }

    /// Flushes, then returns the stream on which work queued next sees
    /// every byte landed so far.
    pub fn readers_stream(&self) -> Result<&Stream> {
        self.flush()?;
        Ok(&self.stream)
    }
}

impl Drop for GpuMirror {
    fn drop(&mut self) {
        // A queued copy still reads the mirror and writes the mapping.
        if self.stream.context().make_current().is_ok() {
            let _ = self.stream.sync();
            let _ = self.side.sync();
        }
    }
}
