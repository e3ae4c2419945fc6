//! Registered memory and the seam between it and the sockets.
//!
//! A request never touches user memory directly: the workers ask the region's
//! [`TxPath`] for bytes to send and its [`RxPath`] for where received bytes go.
//! Host memory answers with its own pointer; later kinds (CUDA bounce,
//! devmem) stage through other memory behind the same two traits, so the
//! wire protocol and the API do not change when they arrive.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devmem::cuda::mem::DeviceSpan;

use crate::device::PtrKinds;
use crate::error::{Error, Result};

/// Page-aligned host memory owned by the caller, lazily zeroed (anonymous mmap).
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: HostMemory owns its mapping exclusively, like a Box<[u8]>.
unsafe impl Send for HostMemory {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// `len` zero bytes. Zero-length allocations are allowed.
    pub fn zeroed(len: usize) -> Result<Self> {
        if len == 0 {
            return Ok(HostMemory {
                ptr: NonNull::dangling(),
                len,
            });
        }
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io("mmap", std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| Error::InvalidArgument("mmap returned null".into()))?;
        Ok(HostMemory { ptr, len })
    }

    /// A copy of `data` in fresh page-aligned memory.
    pub fn from_slice(data: &[u8]) -> Result<Self> {
        let mut m = Self::zeroed(data.len())?;
        m.copy_from_slice(data);
        Ok(m)
    }
}

impl std::ops::Deref for HostMemory {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0) for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HostMemory {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping was created in zeroed() with this length.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

impl std::fmt::Debug for HostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostMemory({} bytes)", self.len)
    }
}

/// Kind of a registered pointer (`NCCL_PTR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtrKind {
    Host,
    Cuda,
}

impl PtrKind {
    pub fn as_flag(self) -> PtrKinds {
        match self {
            PtrKind::Host => PtrKinds::HOST,
            PtrKind::Cuda => PtrKinds::CUDA,
        }
    }
}

/// Who stages a region's bytes: every data socket is a lane of its own,
/// and so is every caller thread (inline messages, staged and let go within
/// one call). Chunks at the same region offset in flight at once on
/// different sockets, of one buffer sent twice or received into twice,
/// never share staging, whichever threads serve those sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Lane(u64);

impl Lane {
    /// A lane no one else uses (a new data socket's).
    pub fn fresh() -> Lane {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Lane(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The calling thread's lane.
    pub fn caller() -> Lane {
        thread_local! {
            static LANE: Lane = Lane::fresh();
        }
        LANE.with(|l| *l)
    }
}

/// Where bytes of a region come from when sending. A lane asks for one
/// chunk at a time, and may prefetch the one after it.
pub(crate) trait TxPath: Send + Sync {
    /// Host-addressable bytes `[off, off+len)` of the region, ready to send.
    fn source(&self, lane: Lane, off: u64, len: usize) -> Result<*const u8>;
    /// The kernel holds no reference to the chunk's bytes any more (copying
    /// sends): staging paths may reuse what `source` handed out.
    fn sent(&self, _lane: Lane, _off: u64, _len: usize) {}
    /// Bytes `[off, off+len)` will be asked for soon: staging paths start
    /// copying them now, so the copy overlaps the send before it.
    fn prefetch(&self, _lane: Lane, _off: u64, _len: usize) {}
    /// False when `source` hands out reusable staging, which MSG_ZEROCOPY
    /// would keep referenced past `sent`.
    fn zerocopy_ok(&self) -> bool {
        true
    }
    /// Whether `prefetch` does anything (staging paths): the socket then
    /// takes the chunk after the current one early.
    fn prefetches(&self) -> bool {
        false
    }
}

/// Where received bytes of a region go. A lane receives one chunk at a
/// time: `sink` for its first bytes and again for the rest, then `landed`,
/// or `abandon` when the chunk is cut short.
pub(crate) trait RxPath: Send + Sync {
    /// Host-addressable memory for bytes `[off, off+len)` of the region.
    fn sink(&self, lane: Lane, off: u64, len: usize) -> Result<*mut u8>;
    /// Bytes `[off, off+len)` are now in the sink (staging paths copy onward here).
    fn landed(&self, lane: Lane, off: u64, len: usize) -> Result<()>;
    /// The chunk starting at `off` will not land: its staging goes back.
    fn abandon(&self, _lane: Lane, _off: u64) {}
    /// Every byte this thread saw land is in place (staging paths copy
    /// asynchronously in `landed`); called before a receive counts as done.
    fn settle(&self) -> Result<()> {
        Ok(())
    }
    /// Whether landed bytes still move on asynchronously (`settle` waits).
    fn stages(&self) -> bool {
        false
    }
}

pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
    kind: PtrKind,
    /// Keeps owned memory alive as long as any request holds the region.
    _owned: Option<HostMemory>,
    /// Staging for `PtrKind::Cuda` (the bounce path).
    bounce: Option<crate::bounce::CudaBounce>,
    /// How each devmem TX NIC names the region (index: NIC); empty when
    /// none does (`region_tx::attach`).
    devmem_tx: Vec<Option<crate::region_tx::RegionTx>>,
}

// SAFETY: the region is a (pointer, length) pair; exclusivity of access is
// enforced by MemoryRegion (no access while requests hold a reference).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    pub(crate) fn kind(&self) -> PtrKind {
        self.kind
    }

    /// How devmem TX NIC `nic` names the region, if it does.
    pub(crate) fn devmem_tx(&self, nic: usize) -> Option<&crate::region_tx::RegionTx> {
        self.devmem_tx.get(nic).and_then(Option::as_ref)
    }

    /// Some NIC sends the region by devmem TX (from its DMA-BUF).
    pub(crate) fn any_devmem_tx(&self) -> bool {
        self.devmem_tx.iter().any(Option::is_some)
    }

    /// Every NIC sends the region by devmem TX: it is never staged.
    fn devmem_tx_only(&self) -> bool {
        !self.devmem_tx.is_empty() && self.devmem_tx.iter().all(Option::is_some)
    }

    /// The GPU a CUDA region is on; `None` for host memory.
    pub(crate) fn cuda_ordinal(&self) -> Option<i32> {
        self.bounce.as_ref().map(|b| b.ordinal())
    }

    /// Device memory `[off, off+len)` of a CUDA region, for kernels that
    /// write received bytes straight into it (GPU RX pools).
    pub(crate) fn device_span(&self, off: u64, len: usize) -> Result<DeviceSpan> {
        let off = self.check(off, len)?;
        if self.kind != PtrKind::Cuda {
            return Err(Error::InvalidArgument(
                "host memory has no device address".into(),
            ));
        }
        // SAFETY: the range is inside the region (checked above), which is
        // device memory that stays valid while a request holds the region
        // (`MemoryRegion::cuda`'s contract); work queued on the span ends
        // before its request completes.
        Ok(unsafe { DeviceSpan::new(self.ptr as u64 + off as u64, len) })
    }

    fn cuda(&self) -> Result<&crate::bounce::CudaBounce> {
        self.bounce
            .as_ref()
            .ok_or_else(|| Error::Unsupported("CUDA region without staging".into()))
    }

    fn check(&self, off: u64, len: usize) -> Result<usize> {
        let end = off.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len as u64 => Ok(off as usize),
            _ => Err(Error::InvalidArgument(format!(
                "bytes {off}+{len} outside the {}-byte region",
                self.len
            ))),
        }
    }
}

impl TxPath for Region {
    fn source(&self, lane: Lane, off: u64, len: usize) -> Result<*const u8> {
        let off = self.check(off, len)?;
        match self.kind {
            // SAFETY: off+len is inside the region (checked above).
            PtrKind::Host => Ok(unsafe { self.ptr.add(off) }),
            PtrKind::Cuda => self.cuda()?.source(lane, off as u64, len),
        }
    }
    fn sent(&self, lane: Lane, off: u64, len: usize) {
        if let Some(b) = &self.bounce {
            b.sent(lane, off, len);
        }
    }
    fn prefetch(&self, lane: Lane, off: u64, len: usize) {
        if self.devmem_tx_only() {
            return;
        }
        if let (Some(b), Ok(_)) = (&self.bounce, self.check(off, len)) {
            b.prefetch(lane, off, len);
        }
    }
    fn zerocopy_ok(&self) -> bool {
        self.bounce.is_none()
    }
    fn prefetches(&self) -> bool {
        self.bounce.is_some() && !self.devmem_tx_only()
    }
}

impl RxPath for Region {
    fn sink(&self, lane: Lane, off: u64, len: usize) -> Result<*mut u8> {
        let off = self.check(off, len)?;
        match self.kind {
            // SAFETY: off+len is inside the region (checked above).
            PtrKind::Host => Ok(unsafe { self.ptr.add(off) }),
            PtrKind::Cuda => self.cuda()?.sink(lane, off as u64, len),
        }
    }
    fn landed(&self, lane: Lane, off: u64, len: usize) -> Result<()> {
        match &self.bounce {
            Some(b) => b.landed(lane, off, len),
            None => Ok(()),
        }
    }
    fn abandon(&self, lane: Lane, off: u64) {
        if let Some(b) = &self.bounce {
            b.abandon(lane, off);
        }
    }
    fn settle(&self) -> Result<()> {
        match &self.bounce {
            Some(b) => b.settle(),
            None => Ok(()),
        }
    }
    fn stages(&self) -> bool {
        self.bounce.is_some()
    }
}

/// Registered memory. Requests hold it while in flight; the bytes can be
/// read or written only when no request does (`Error::Busy` otherwise).
pub struct MemoryRegion {
    pub(crate) inner: Arc<Region>,
}

impl MemoryRegion {
    pub(crate) fn owned(mem: HostMemory) -> Self {
        MemoryRegion {
            inner: Arc::new(Region {
                ptr: mem.ptr.as_ptr(),
                len: mem.len,
                kind: PtrKind::Host,
                _owned: Some(mem),
                bounce: None,
                devmem_tx: Vec::new(),
            }),
        }
    }

    /// # Safety
    /// `ptr..ptr+len` must stay valid (and, for `Host`, not be accessed by
    /// anyone else) until the region is deregistered and every request using
    /// it has completed.
    pub(crate) unsafe fn foreign(ptr: *mut u8, len: usize, kind: PtrKind) -> Self {
        MemoryRegion {
            inner: Arc::new(Region {
                ptr,
                len,
                kind,
                _owned: None,
                bounce: None,
                devmem_tx: Vec::new(),
            }),
        }
    }

    /// # Safety
    /// As [`MemoryRegion::foreign`], for device memory moved by `bounce`.
    pub(crate) unsafe fn cuda(ptr: *mut u8, len: usize, bounce: crate::bounce::CudaBounce) -> Self {
        MemoryRegion {
            inner: Arc::new(Region {
                ptr,
                len,
                kind: PtrKind::Cuda,
                _owned: None,
                bounce: Some(bounce),
                devmem_tx: Vec::new(),
            }),
        }
    }

    /// True when a CUDA region also has a DMA-BUF fd (for the devmem TX path).
    pub fn has_dmabuf(&self) -> bool {
        self.inner.bounce.as_ref().is_some_and(|b| b.has_dmabuf())
    }

    /// The DMA-BUF of a CUDA region.
    pub(crate) fn dmabuf(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.bounce.as_ref().and_then(|b| b.dmabuf())
    }

    /// Sets how the devmem TX NICs name the region; only at registration,
    /// while no request holds it.
    pub(crate) fn set_devmem_tx(&mut self, names: Vec<Option<crate::region_tx::RegionTx>>) {
        if let Some(r) = Arc::get_mut(&mut self.inner) {
            r.devmem_tx = names;
        }
    }

    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    pub fn kind(&self) -> PtrKind {
        self.inner.kind
    }

    /// The GPU a CUDA region is on; `None` for host memory.
    pub fn cuda_ordinal(&self) -> Option<i32> {
        self.inner.cuda_ordinal()
    }

    /// Start address (for the C ABI's pointer arithmetic).
    pub fn addr(&self) -> usize {
        self.inner.ptr as usize
    }

    /// True while a request still uses the region.
    pub fn in_flight(&self) -> bool {
        Arc::strong_count(&self.inner) > 1
    }

    fn host_ptr(&mut self) -> Result<*mut u8> {
        if self.inner.kind != PtrKind::Host {
            return Err(Error::InvalidArgument(
                "only host memory can be viewed as bytes".into(),
            ));
        }
        // get_mut proves no request holds a clone, and &mut self that nobody can make one.
        let r = Arc::get_mut(&mut self.inner).ok_or(Error::Busy)?;
        Ok(r.ptr)
    }

    /// The bytes, when no request is using them.
    pub fn bytes(&mut self) -> Result<&[u8]> {
        let (p, len) = (self.host_ptr()?, self.inner.len);
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: host memory valid for len bytes; no request holds the region.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }

    /// The bytes for writing, when no request is using them.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8]> {
        let (p, len) = (self.host_ptr()?, self.inner.len);
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in bytes(), and &mut self makes this the only view.
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// Takes back owned memory once nothing uses it.
    pub(crate) fn into_owned(self) -> Result<Option<HostMemory>> {
        match Arc::try_unwrap(self.inner) {
            Ok(mut r) => Ok(r._owned.take()),
            Err(_) => Err(Error::Busy),
        }
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemoryRegion({:?}, {} bytes)",
            self.inner.kind, self.inner.len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_busy_while_held() {
        let mut mr = MemoryRegion::owned(HostMemory::from_slice(b"hello").unwrap());
        assert_eq!(mr.bytes().unwrap(), b"hello");
        let held = mr.inner.clone();
        assert_eq!(mr.bytes_mut().unwrap_err(), Error::Busy);
        assert!(mr.in_flight());
        drop(held);
        mr.bytes_mut().unwrap()[0] = b'j';
        assert_eq!(&*mr.into_owned().unwrap().unwrap(), b"jello");
    }

    #[test]
    fn out_of_range_access_is_refused() {
        let mr = MemoryRegion::owned(HostMemory::zeroed(10).unwrap());
        assert!(mr.inner.source(Lane::caller(), 8, 3).is_err());
        assert!(mr.inner.sink(Lane::caller(), u64::MAX, 1).is_err());
        assert!(mr.inner.sink(Lane::caller(), 10, 0).is_ok());
    }
}
