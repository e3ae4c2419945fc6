//! A GPU RX pool as the emulated NIC writes it. A real NIC DMAs payload
//! into GPU memory; the software NIC lands it in a pinned host mirror of the
//! pool and copies the dirty span to the GPU when a receive completes.
//!
//! The mirror starts as a copy of the GPU pool and every write to the pool
//! goes through it, so mirror and GPU agree outside the dirty span: a span
//! may be copied whole, gaps included, without clobbering anything. That
//! holds while this mirror is the only writer of the pool (the daemon
//! exports the pool and never writes it).

use super::mem::{PinnedBuffer, Stream};
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
    dirty: Option<(usize, usize)>,
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
            stream,
            dirty: None,
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
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                CudaError::InvalidArgument(format!(
                    "bytes {offset}+{len} outside the {}-byte GPU pool",
                    self.len()
                ))
            })?;
        if let Some((lo, hi)) = self.dirty {
            if offset > hi.saturating_add(MERGE_GAP) || end.saturating_add(MERGE_GAP) < lo {
                self.flush()?;
            }
        }
        self.dirty = Some(match self.dirty {
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
        if let Some((lo, hi)) = self.dirty {
            if offset > hi.saturating_add(MERGE_GAP) || end.saturating_add(MERGE_GAP) < lo {
                // Only bytes written already are flushed here.
                self.flush()?;
            }
        }
        self.mark(offset, end - offset)
    }

    /// Copies the dirty span to the GPU and waits: afterwards kernels on
    /// any stream see the landed bytes.
    pub fn flush(&mut self) -> Result<()> {
        let Some((lo, hi)) = self.dirty.take() else {
            return Ok(());
        };
        self.stream.context().make_current()?;
        // SAFETY: lo..hi lies in both the mirror and the mapping (checked in
        // mark); &mut self keeps the mirror unwritten until the sync.
        unsafe {
            self.stream.htod(
                self.mapping.ptr() + lo as u64,
                self.host.as_ptr().add(lo),
                hi - lo,
            )?
        };
        self.stream.sync()
    }
}
