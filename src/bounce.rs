//! CUDA memory without a devmem NIC: every chunk passes through pinned host
//! staging, and the copies overlap the wire. TX: when a socket starts a
//! chunk, the device-to-host copy of its next chunk is queued
//! (`prefetch`), so the copy runs while the current one is sent. RX: a
//! received chunk's host-to-device copy is queued in `landed` and the socket
//! goes on receiving; `settle` waits for the copies of a socket's share of a
//! message before it counts as done. A receive is therefore complete only
//! when its data is visible on the GPU, which is what NCCL's `iflush` asks
//! for.
//!
//! Staging is a pool of pinned slots, each as large as the largest chunk,
//! shared by every CUDA region of the process, sized by
//! `Config::staging_bytes` (`TCPX_STAGING_BYTES`), allocated whole when the
//! first CUDA region is registered and reused; a socket holds about two per
//! direction (the chunk on the wire and the one being copied). Sends from
//! staging never use MSG_ZEROCOPY: the slot goes back to the pool as soon as
//! the kernel has copied it.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use devmem::cuda::mem::{self, Event, MemKind, PinnedBuffer, Stream};
use devmem::cuda::{self, Context, CudaError};

use crate::error::{Error, Result};
use crate::memory::{Lane, RxPath, TxPath};

/// Registration rule of the TCPX plugin (`tcpxRegMr`: `data % PAGE_SIZE`).
pub(crate) const CUDA_REG_ALIGN: usize = 4096;

/// How long a staging copy may take before the transfer fails: a chunk's
/// copy takes microseconds, so only a hung or blocked GPU gets near it.
const COPY_DEADLINE: Duration = Duration::from_secs(10);

pub(crate) fn cuda_error(e: CudaError) -> Error {
    match e {
        CudaError::Timeout { what, after_ms } => Error::Timeout {
            what: what.into(),
            after_ms,
        },
        CudaError::NoDriver(_) | CudaError::NoDevice(_) | CudaError::Nvrtc(_) => {
            Error::Unsupported(e.to_string())
        }
        CudaError::InvalidArgument(m) => Error::InvalidArgument(m),
        e => Error::Io {
            op: "CUDA",
            kind: std::io::ErrorKind::Other,
            msg: e.to_string(),
        },
    }
}

/// True when CUDA memory can be registered here (driver and a device present).
pub(crate) fn cuda_usable() -> bool {
    cuda::available()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pinned staging buffer and the event that marks the end of its last
/// copy (made once: recording is cheaper than creating an event per chunk).
struct Slot {
    buf: PinnedBuffer,
    copied: Event,
}

impl Slot {
    fn alloc(ctx: &'static Context, len: usize) -> Result<Self> {
        Ok(Slot {
            buf: PinnedBuffer::alloc(ctx, len).map_err(cuda_error)?,
            copied: Event::new(ctx).map_err(cuda_error)?,
        })
    }

    fn ptr(&self) -> *mut u8 {
        self.buf.as_ptr()
    }

    /// Waits for the slot's last queued copy, within `COPY_DEADLINE`.
    fn wait(&self) -> cuda::Result<()> {
        self.copied.wait("CUDA staging copy", COPY_DEADLINE)
    }
}

/// Chunk-sized pinned buffers, reused across messages and regions.
pub(crate) struct StagingPool {
    ctx: &'static Context,
    slot_len: usize,
    max_slots: usize,
    free: Mutex<(Vec<Slot>, usize)>,
}

impl StagingPool {
    /// The process's pool for this device and slot size, allocated whole on
    /// first use (a registration), so that the data path does not allocate
    /// pinned memory, which is slow.
    fn shared(ctx: &'static Context, slot_len: usize, bytes: usize) -> Result<Arc<StagingPool>> {
        type Pools = Mutex<HashMap<(i32, usize), Arc<StagingPool>>>;
        static POOLS: OnceLock<Pools> = OnceLock::new();
        let mut pools = lock(POOLS.get_or_init(Default::default));
        if let Some(p) = pools.get(&(ctx.ordinal(), slot_len)) {
            return Ok(p.clone());
        }
        let max_slots = (bytes / slot_len).max(2);
        let free = (0..max_slots)
            .map(|_| Slot::alloc(ctx, slot_len))
            .collect::<Result<Vec<_>>>()?;
        let pool = Arc::new(StagingPool {
            ctx,
            slot_len,
            max_slots,
            free: Mutex::new((free, max_slots)),
        });
        tracing::info!(
            gpu = ctx.ordinal(),
            "CUDA bounce staging: {max_slots} pinned slots of {slot_len} B"
        );
        pools.insert((ctx.ordinal(), slot_len), pool.clone());
        Ok(pool)
    }

    fn take(&self, len: usize) -> Result<Slot> {
        if len > self.slot_len {
            return Err(Error::InvalidArgument(format!(
                "chunk of {len} bytes exceeds the {}-byte staging slot; set TCPX_CHUNK_SIZE and TCPX_CUDA_CHUNK_SIZE alike on both ends",
                self.slot_len
            )));
        }
        let mut g = lock(&self.free);
        if let Some(b) = g.0.pop() {
            return Ok(b);
        }
        g.1 += 1;
        if g.1 == self.max_slots + 1 {
            tracing::warn!(
                slots = self.max_slots,
                "CUDA bounce staging exhausted; growing past TCPX_STAGING_BYTES (raise it: about 4 chunks per data socket)"
            );
        }
        drop(g);
        Slot::alloc(self.ctx, self.slot_len)
    }

    fn give(&self, b: Slot) {
        lock(&self.free).0.push(b);
    }

    /// Takes back a slot whose wait failed with `e`: a failed copy left it
    /// idle, but a timed-out one may still use it, so that slot is
    /// abandoned, never freed or reused.
    fn give_after(&self, b: Slot, e: &CudaError) {
        if matches!(e, CudaError::Timeout { .. }) {
            std::mem::forget(b);
        } else {
            self.give(b);
        }
    }
}

thread_local! {
    /// Small per-thread id, naming the thread's copy stream.
    static TID: u64 = {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    };
    /// One copy stream per thread, so workers' copies overlap.
    static STREAM: RefCell<Option<Stream>> = const { RefCell::new(None) };
}

fn with_stream<T>(ctx: &'static Context, f: impl FnOnce(&Stream) -> cuda::Result<T>) -> Result<T> {
    ctx.make_current().map_err(cuda_error)?;
    STREAM.with(|s| {
        let mut s = s.borrow_mut();
        let fresh = match s.as_ref() {
            Some(st) => st.context().ordinal() != ctx.ordinal(),
            None => true,
        };
        if fresh {
            *s = Some(Stream::new(ctx).map_err(cuda_error)?);
        }
        match s.as_ref() {
            Some(st) => f(st).map_err(cuda_error),
            None => Err(Error::Unsupported("no CUDA stream".into())),
        }
    })
}

struct Staged {
    len: usize,
    slot: Slot,
    /// A device-to-host copy into the slot was queued and not yet waited for.
    copying: bool,
}

/// Slots whose host-to-device copies run on one thread's stream, oldest first.
type Copies = VecDeque<Slot>;

/// The TX/RX seam for one registered CUDA region.
pub(crate) struct CudaBounce {
    ctx: &'static Context,
    base: u64,
    pool: Arc<StagingPool>,
    /// (lane, region offset of the chunk) -> its staging.
    tx: Mutex<BTreeMap<(Lane, u64), Staged>>,
    rx: Mutex<BTreeMap<(Lane, u64), Staged>>,
    /// thread -> its received chunks still being copied to the GPU.
    rx_copies: Mutex<HashMap<u64, Copies>>,
    /// DMA-BUF of the region, for the devmem TX path; closed on dereg.
    dmabuf: Option<OwnedFd>,
}

fn tid() -> u64 {
    TID.with(|t| *t)
}

impl CudaBounce {
    /// Checks and prepares device memory `ptr..ptr+len` for the bounce path;
    /// `slot_len` is the largest chunk (or inline message) it must stage.
    pub(crate) fn register(
        ptr: *mut u8,
        len: usize,
        slot_len: usize,
        staging_bytes: usize,
    ) -> Result<Self> {
        cuda::probe().map_err(cuda_error)?;
        if (ptr as usize) % CUDA_REG_ALIGN != 0 {
            return Err(Error::InvalidArgument(format!(
                "CUDA memory at {ptr:p} is not {CUDA_REG_ALIGN}-byte aligned, as TCPX registration requires; register an aligned base and use offsets"
            )));
        }
        // Any context answers pointer queries under unified addressing.
        Context::ensure_any_current().map_err(cuda_error)?;
        let ctx = match mem::pointer_kind(ptr as u64).map_err(cuda_error)? {
            MemKind::Device { ordinal } => Context::get(ordinal).map_err(cuda_error)?,
            other => {
                return Err(Error::InvalidArgument(format!(
                "{ptr:p} is not GPU memory ({other:?}); register it as host memory (TCPX_PTR_HOST)"
            )))
            }
        };
        let dmabuf = match mem::export_dmabuf(ptr as u64, len) {
            Ok(fd) => Some(fd),
            Err(e) => {
                // Only the devmem TX path needs it; the bounce path does not.
                tracing::info!(
                    "no DMA-BUF for the CUDA region ({e}); the bounce path does not need one"
                );
                None
            }
        };
        Ok(CudaBounce {
            ctx,
            base: ptr as u64,
            pool: StagingPool::shared(ctx, slot_len, staging_bytes)?,
            tx: Mutex::new(BTreeMap::new()),
            rx: Mutex::new(BTreeMap::new()),
            rx_copies: Mutex::new(HashMap::new()),
            dmabuf,
        })
    }

    /// The GPU the region is on.
    pub(crate) fn ordinal(&self) -> i32 {
        self.ctx.ordinal()
    }

    pub(crate) fn has_dmabuf(&self) -> bool {
        self.dmabuf.is_some()
    }

    pub(crate) fn dmabuf(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.dmabuf.as_ref().map(std::os::fd::AsFd::as_fd)
    }

    /// Queues the device-to-host copy of `[off, off+len)` into fresh staging.
    fn stage_tx(&self, off: u64, len: usize) -> Result<Staged> {
        let slot = self.pool.take(len)?;
        let queued = with_stream(self.ctx, |st| {
            // SAFETY: the slot holds slot_len >= len pinned bytes; the device
            // range is inside the region (checked by Region); the slot is
            // not read or reused before its event says the copy is done.
            unsafe { st.dtoh(slot.ptr(), self.base + off, len)? };
            // If the event cannot be recorded, the queued copy must still end
            // before the slot goes back.
            slot.copied.record(st).or_else(|e| st.sync().and(Err(e)))
        });
        match queued {
            Ok(()) => Ok(Staged {
                len,
                slot,
                copying: true,
            }),
            Err(e) => {
                self.pool.give(slot);
                Err(e)
            }
        }
    }

    /// Gives staging back once no copy uses it any more.
    fn release(&self, s: Staged) {
        if s.copying {
            if let Err(e) = s.slot.wait() {
                tracing::warn!("{e}");
                return self.pool.give_after(s.slot, &e);
            }
        }
        self.pool.give(s.slot);
    }

    /// Waits for a thread's queued host-to-device copies and returns their
    /// slots. One stream per thread runs them in order: the last covers all.
    fn finish_copies(&self, copies: Copies) -> Result<()> {
        let waited = copies.back().map_or(Ok(()), Slot::wait);
        for s in copies {
            match &waited {
                Ok(()) => self.pool.give(s),
                Err(e) => self.pool.give_after(s, e),
            }
        }
        waited.map_err(cuda_error)
    }

    /// Returns the slots of finished host-to-device copies to the pool.
    fn reclaim(&self, copies: &mut Copies) {
        while copies
            .front()
            .is_some_and(|s| s.copied.done().unwrap_or(false))
        {
            if let Some(s) = copies.pop_front() {
                self.pool.give(s);
            }
        }
    }
}

impl TxPath for CudaBounce {
    fn source(&self, lane: Lane, off: u64, len: usize) -> Result<*const u8> {
        let key = (lane, off);
        // Waits happen outside the map's lock: other workers use it too.
        let staged = lock(&self.tx).remove(&key);
        let mut s = match staged {
            // Prefetched, or the same chunk again after a partial send.
            Some(s) if s.len == len => s,
            other => {
                if let Some(old) = other {
                    self.release(old);
                }
                self.stage_tx(off, len)?
            }
        };
        if s.copying {
            if let Err(err) = s.slot.wait() {
                self.pool.give_after(s.slot, &err);
                return Err(cuda_error(err));
            }
            s.copying = false;
        }
        let p = s.slot.ptr();
        lock(&self.tx).insert(key, s);
        Ok(p)
    }

    fn prefetch(&self, lane: Lane, off: u64, len: usize) {
        let key = (lane, off);
        if lock(&self.tx).contains_key(&key) {
            return;
        }
        // A failed prefetch is retried, and reported, by `source`.
        if let Ok(s) = self.stage_tx(off, len) {
            if let Some(old) = lock(&self.tx).insert(key, s) {
                self.release(old);
            }
        }
    }

    fn sent(&self, lane: Lane, off: u64, _len: usize) {
        let staged = lock(&self.tx).remove(&(lane, off));
        if let Some(s) = staged {
            self.release(s);
        }
    }

    fn zerocopy_ok(&self) -> bool {
        false
    }
}

impl RxPath for CudaBounce {
    fn sink(&self, lane: Lane, off: u64, len: usize) -> Result<*mut u8> {
        let mut rx = lock(&self.rx);
        if let Some((&(_, start), s)) = rx.range((lane, 0)..=(lane, off)).next_back() {
            if off < start + s.len as u64 {
                // The rest of a chunk already being received.
                let at = (off - start) as usize;
                // SAFETY: at < s.len <= the slot's length.
                return Ok(unsafe { s.slot.ptr().add(at) });
            }
        }
        drop(rx);
        let slot = self.pool.take(len)?;
        let p = slot.ptr();
        rx = lock(&self.rx);
        let staged = Staged {
            len,
            slot,
            copying: false,
        };
        if let Some(old) = rx.insert((lane, off), staged) {
            self.pool.give(old.slot);
        }
        Ok(p)
    }

    fn landed(&self, lane: Lane, off: u64, len: usize) -> Result<()> {
        let tid = tid();
        let staged = lock(&self.rx).remove(&(lane, off));
        let Some(s) = staged else {
            return if len == 0 {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "bytes {off}+{len} landed without staging"
                )))
            };
        };
        // Queued, not waited for: the socket receives its next chunk while
        // this one crosses to the GPU; `settle` waits before completion.
        let queued = with_stream(self.ctx, |st| {
            // SAFETY: the slot holds len received bytes; the device range is
            // inside the region; the slot stays out of the pool until its
            // event says the copy is done.
            unsafe { st.htod(self.base + off, s.slot.ptr(), len.min(s.len))? };
            s.slot.copied.record(st).or_else(|e| st.sync().and(Err(e)))
        });
        match queued {
            Ok(()) => {
                let mut copies = lock(&self.rx_copies);
                let q = copies.entry(tid).or_default();
                q.push_back(s.slot);
                self.reclaim(q);
                Ok(())
            }
            Err(e) => {
                self.pool.give(s.slot);
                Err(e)
            }
        }
    }

    fn abandon(&self, lane: Lane, off: u64) {
        let staged = lock(&self.rx).remove(&(lane, off));
        if let Some(s) = staged {
            // No copy was queued from it: receiving wrote it, nothing else.
            self.pool.give(s.slot);
        }
    }

    fn settle(&self) -> Result<()> {
        let copies = lock(&self.rx_copies).remove(&tid());
        copies.map_or(Ok(()), |q| self.finish_copies(q))
    }
}

impl Drop for CudaBounce {
    fn drop(&mut self) {
        // A failed request can leave copies queued; none may outlive its staging.
        let tx = std::mem::take(&mut *lock(&self.tx));
        for s in tx.into_values() {
            self.release(s);
        }
        let copies = std::mem::take(&mut *lock(&self.rx_copies));
        for q in copies.into_values() {
            // A failed copy drops its slots rather than reuse them.
            let _ = self.finish_copies(q);
        }
        let rx = std::mem::take(&mut *lock(&self.rx));
        for s in rx.into_values() {
            self.pool.give(s.slot);
        }
    }
}

/// Creates a device buffer, for tests and benches that need GPU memory.
pub fn cuda_alloc(ordinal: i32, len: usize) -> Result<devmem::cuda::mem::DeviceBuffer> {
    let ctx = Context::get(ordinal).map_err(cuda_error)?;
    mem::DeviceBuffer::alloc(ctx, len).map_err(cuda_error)
}

/// Refuses a device pointer registered as host memory (when CUDA is here to ask).
pub(crate) fn refuse_device_as_host(ptr: *mut u8) -> Result<()> {
    if ptr.is_null() || !cuda_usable() || Context::ensure_any_current().is_err() {
        return Ok(());
    }
    match mem::pointer_kind(ptr as u64) {
        Ok(MemKind::Device { ordinal }) => Err(Error::InvalidArgument(format!(
            "{ptr:p} is memory of GPU {ordinal}; register it as CUDA memory (TCPX_PTR_CUDA)"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_copy_is_a_transport_timeout() {
        let e = cuda_error(CudaError::Timeout {
            what: "CUDA staging copy",
            after_ms: COPY_DEADLINE.as_millis() as u64,
        });
        assert_eq!(
            e,
            Error::Timeout {
                what: "CUDA staging copy".into(),
                after_ms: 10_000
            }
        );
    }
}
