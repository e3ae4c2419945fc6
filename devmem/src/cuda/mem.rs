//! Device and pinned memory, streams, copies, pointer kinds, DMA-BUF export.

use std::ffi::c_void;
use std::os::fd::{FromRawFd, OwnedFd};

use super::{ck, sys, Context, CudaError, Result};

/// Where a pointer lives, as `cuPointerGetAttribute` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemKind {
    /// GPU memory of device `ordinal` (cudaMalloc, VMM, managed).
    Device { ordinal: i32 },
    /// Host memory that CUDA registered or allocated (pinned).
    PinnedHost,
    /// Memory CUDA does not know: plain host memory.
    Unknown,
}

/// The kind of memory at `ptr`. Needs a context current (any device).
pub fn pointer_kind(ptr: u64) -> Result<MemKind> {
    let mut ty: u32 = 0;
    // SAFETY: MEMORY_TYPE writes one CUmemorytype (a u32).
    let r = ck("cuPointerGetAttribute(MEMORY_TYPE)", || unsafe {
        sys::cuPointerGetAttribute(
            (&mut ty as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            ptr,
        )
    });
    match r {
        Ok(()) => {}
        // Memory CUDA never saw answers INVALID_VALUE.
        Err(CudaError::Driver { ref name, .. }) if name.contains("INVALID_VALUE") => {
            return Ok(MemKind::Unknown)
        }
        Err(e) => return Err(e),
    }
    if ty == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        let mut ordinal: i32 = -1;
        // SAFETY: DEVICE_ORDINAL writes one int.
        ck("cuPointerGetAttribute(DEVICE_ORDINAL)", || unsafe {
            sys::cuPointerGetAttribute(
                (&mut ordinal as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        })?;
        Ok(MemKind::Device { ordinal })
    } else if ty == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32 {
        Ok(MemKind::PinnedHost)
    } else {
        Ok(MemKind::Unknown)
    }
}

/// Exports `[ptr, ptr+len)` of device memory as a DMA-BUF fd
/// (`cuMemGetHandleForAddressRange`, as the TCPX plugin's regMr does).
/// `ptr` must be 4 KiB aligned; `len` is rounded up to 4 KiB.
pub fn export_dmabuf(ptr: u64, len: usize) -> Result<OwnedFd> {
    if ptr % 4096 != 0 {
        return Err(CudaError::InvalidArgument(format!(
            "DMA-BUF export needs a 4 KiB aligned address, got {ptr:#x}"
        )));
    }
    let size = len.div_ceil(4096).max(1) * 4096;
    let mut fd: i32 = -1;
    // SAFETY: writes one int fd on success.
    ck("cuMemGetHandleForAddressRange(DMA_BUF_FD)", || unsafe {
        sys::cuMemGetHandleForAddressRange(
            (&mut fd as *mut i32).cast(),
            ptr,
            size,
            sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    })?;
    if fd < 0 {
        return Err(CudaError::Driver {
            call: "cuMemGetHandleForAddressRange",
            name: "returned no fd".into(),
        });
    }
    // SAFETY: the driver handed us a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

mod sealed {
    pub trait Sealed {}
}

/// Device memory a kernel or copy may touch: `device_len` bytes at
/// `device_ptr`, live while `self` is. Sealed: safe code launches on these
/// ranges, so only this crate's owning types may claim one.
pub trait DeviceMem: sealed::Sealed {
    /// Device address of the first byte.
    fn device_ptr(&self) -> u64;
    /// Bytes.
    fn device_len(&self) -> usize;
}

impl sealed::Sealed for DeviceBuffer {}
impl DeviceMem for DeviceBuffer {
    fn device_ptr(&self) -> u64 {
        self.ptr
    }
    fn device_len(&self) -> usize {
        self.len
    }
}

impl sealed::Sealed for super::vmm::Mapping {}
impl DeviceMem for super::vmm::Mapping {
    fn device_ptr(&self) -> u64 {
        self.ptr()
    }
    fn device_len(&self) -> usize {
        self.size()
    }
}

impl sealed::Sealed for super::vmm::MappedRange {}
impl DeviceMem for super::vmm::MappedRange {
    fn device_ptr(&self) -> u64 {
        self.ptr()
    }
    fn device_len(&self) -> usize {
        self.size()
    }
}

/// Device memory owned by someone else: a registered user buffer that
/// kernels write into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpan {
    ptr: u64,
    len: usize,
}

impl DeviceSpan {
    /// `len` bytes at device address `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be device memory that stays valid while the
    /// span, or any work queued on it, is in use.
    pub unsafe fn new(ptr: u64, len: usize) -> Self {
        DeviceSpan { ptr, len }
    }
}

impl sealed::Sealed for DeviceSpan {}
impl DeviceMem for DeviceSpan {
    fn device_ptr(&self) -> u64 {
        self.ptr
    }
    fn device_len(&self) -> usize {
        self.len
    }
}

/// `cuMemAlloc` memory, freed on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    ctx: &'static Context,
    ptr: u64,
    len: usize,
}

impl DeviceBuffer {
    pub fn alloc(ctx: &'static Context, len: usize) -> Result<Self> {
        ctx.make_current()?;
        let mut ptr = 0;
        // SAFETY: writes one device pointer.
        ck("cuMemAlloc", || unsafe {
            sys::cuMemAlloc_v2(&mut ptr, len.max(1))
        })?;
        Ok(DeviceBuffer { ctx, ptr, len })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` to offset `off` and waits.
    pub fn write(&self, off: usize, src: &[u8]) -> Result<()> {
        self.bounds(off, src.len())?;
        self.ctx.make_current()?;
        // SAFETY: bounds checked; src is valid for its length.
        ck("cuMemcpyHtoD", || unsafe {
            sys::cuMemcpyHtoD_v2(self.ptr + off as u64, src.as_ptr().cast(), src.len())
        })
    }

    /// Copies from offset `off` into `dst` and waits.
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.bounds(off, dst.len())?;
        self.ctx.make_current()?;
        // SAFETY: bounds checked; dst is valid for its length.
        ck("cuMemcpyDtoH", || unsafe {
            sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), self.ptr + off as u64, dst.len())
        })
    }

    /// Fills with `byte` and waits.
    pub fn fill(&self, byte: u8) -> Result<()> {
        self.ctx.make_current()?;
        // SAFETY: the whole allocation.
        ck("cuMemsetD8", || unsafe {
            sys::cuMemsetD8_v2(self.ptr, byte, self.len)
        })
    }

    fn bounds(&self, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CudaError::InvalidArgument(format!(
                "bytes {off}+{len} outside the {}-byte device buffer",
                self.len
            ))),
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: allocated by cuMemAlloc in alloc(); freed once.
            let _ = ck("cuMemFree", || unsafe { sys::cuMemFree_v2(self.ptr) });
        }
    }
}

/// Copies each row of `rows` from device `src` to host `dst` and waits:
/// the few pool fragments of a GPU-pool receive that belong in host memory,
/// such as chunk headers. Queued on `after` when the bytes are still landing
/// there, else one synchronous `cuMemcpyDtoH` each (it orders after no
/// non-blocking stream). `ctx` must own `src`.
pub fn read_rows(
    ctx: &'static Context,
    after: Option<&Stream>,
    src: &(impl DeviceMem + ?Sized),
    dst: &mut [u8],
    rows: &[super::unpack::Frag],
) -> Result<()> {
    super::unpack::Unpacker::check(rows, src.device_len(), dst.len())?;
    ctx.make_current()?;
    for r in rows {
        let (to, from) = (
            // SAFETY: the row lies inside dst (checked above).
            unsafe { dst.as_mut_ptr().add(r.dst as usize) },
            src.device_ptr() + r.src,
        );
        match after {
            // SAFETY: the row lies inside src and dst (checked above); dst
            // stays borrowed until the stream's sync below.
            Some(s) => unsafe { s.dtoh(to, from, r.len as usize)? },
            // SAFETY: as above; the copy is finished when the call returns.
            None => ck("cuMemcpyDtoH", || unsafe {
                sys::cuMemcpyDtoH_v2(to.cast(), from, r.len as usize)
            })?,
        }
    }
    match after {
        Some(s) => s.sync(),
        None => Ok(()),
    }
}

/// Page-locked host memory (`cuMemHostAlloc`, portable), freed on drop.
#[derive(Debug)]
pub struct PinnedBuffer {
    ctx: &'static Context,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access hands out raw pointers only; users synchronise.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn alloc(ctx: &'static Context, len: usize) -> Result<Self> {
        ctx.make_current()?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: writes one host pointer.
        ck("cuMemHostAlloc", || unsafe {
            sys::cuMemHostAlloc(&mut p, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
        })?;
        Ok(PinnedBuffer {
            ctx,
            ptr: p.cast(),
            len,
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc; freed once.
            let _ = ck("cuMemFreeHost", || unsafe {
                sys::cuMemFreeHost(self.ptr.cast())
            });
        }
    }
}

/// A stream (non-blocking unless made by [`Stream::blocking`]), destroyed on drop.
#[derive(Debug)]
pub struct Stream {
    ctx: &'static Context,
    s: sys::CUstream,
}

// SAFETY: CUDA streams may be used from any thread with the context current.
unsafe impl Send for Stream {}

impl Stream {
    pub fn new(ctx: &'static Context) -> Result<Self> {
        ctx.make_current()?;
        let mut s = std::ptr::null_mut();
        // SAFETY: writes one handle.
        ck("cuStreamCreate", || unsafe {
            sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        })?;
        Ok(Stream { ctx, s })
    }

    /// A blocking stream (flags 0): one that work on the legacy default
    /// stream waits for, as the streams of most CUDA applications are.
    pub fn blocking(ctx: &'static Context) -> Result<Self> {
        ctx.make_current()?;
        let mut s = std::ptr::null_mut();
        // SAFETY: writes one handle.
        ck("cuStreamCreate", || unsafe {
            sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_DEFAULT as u32)
        })?;
        Ok(Stream { ctx, s })
    }

    pub fn raw(&self) -> sys::CUstream {
        self.s
    }

    /// Queues a wait for `e`: later work on this stream starts after the
    /// work `e` marks.
    pub fn wait_event(&self, e: &Event) -> Result<()> {
        // SAFETY: a live stream and event.
        ck("cuStreamWaitEvent", || unsafe {
            sys::cuStreamWaitEvent(self.s, e.e, 0)
        })
    }

    pub fn context(&self) -> &'static Context {
        self.ctx
    }

    pub fn sync(&self) -> Result<()> {
        // SAFETY: a live stream.
        ck("cuStreamSynchronize", || unsafe {
            sys::cuStreamSynchronize(self.s)
        })
    }

    /// Device to host, queued on the stream.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes (pinned for a truly async copy)
    /// and `src..src+len` device memory, both until the stream is synced.
    pub unsafe fn dtoh(&self, dst: *mut u8, src: u64, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller's contract.
        ck("cuMemcpyDtoHAsync", || unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, len, self.s)
        })
    }

    /// Host to device, queued on the stream.
    ///
    /// # Safety
    /// As [`Stream::dtoh`], with the roles swapped.
    pub unsafe fn htod(&self, dst: u64, src: *const u8, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller's contract.
        ck("cuMemcpyHtoDAsync", || unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, self.s)
        })
    }

    /// Copies each row of `rows` from host `src` to `dst` and waits: the
    /// linear (header-split) fragments of a receive into GPU memory.
    pub fn write_rows(
        &self,
        src: &[u8],
        dst: &(impl DeviceMem + ?Sized),
        rows: &[super::unpack::Frag],
    ) -> Result<()> {
        super::unpack::Unpacker::check(rows, src.len(), dst.device_len())?;
        self.ctx.make_current()?;
        for r in rows {
            // SAFETY: the row lies inside src and dst (checked above); both
            // stay borrowed until the sync below.
            unsafe {
                self.htod(
                    dst.device_ptr() + r.dst,
                    src.as_ptr().add(r.src as usize),
                    r.len as usize,
                )?
            };
        }
        self.sync()
    }

    /// Device to device, queued on the stream.
    ///
    /// # Safety
    /// Both ranges must be device memory valid until the stream is synced.
    pub unsafe fn dtod(&self, dst: u64, src: u64, len: usize) -> Result<()> {
        // SAFETY: forwarded to the caller's contract.
        ck("cuMemcpyDtoDAsync", || unsafe {
            sys::cuMemcpyDtoDAsync_v2(dst, src, len, self.s)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: created in new(); destroyed once.
            let _ = ck("cuStreamDestroy", || unsafe {
                sys::cuStreamDestroy_v2(self.s)
            });
        }
    }
}

/// A completion marker in a stream (no timing), destroyed on drop.
#[derive(Debug)]
pub struct Event {
    ctx: &'static Context,
    e: sys::CUevent,
}

// SAFETY: CUDA events may be used from any thread with the context current.
unsafe impl Send for Event {}

impl Event {
    /// An event to record, and re-record, in the context's streams.
    pub fn new(ctx: &'static Context) -> Result<Self> {
        ctx.make_current()?;
        let mut e = std::ptr::null_mut();
        // SAFETY: writes one handle.
        ck("cuEventCreate", || unsafe {
            sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
        })?;
        Ok(Event { ctx, e })
    }

    /// Marks the end of the work queued so far on `stream`.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        // SAFETY: a live event and stream.
        ck("cuEventRecord", || unsafe {
            sys::cuEventRecord(self.e, stream.raw())
        })
    }

    /// True once the work before the event has finished.
    pub fn done(&self) -> Result<bool> {
        // SAFETY: a live event.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            sys::cuEventQuery(self.e)
        }))
        .map_err(|_| CudaError::NoDriver("cuEventQuery is missing".into()))?;
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            _ => ck("cuEventQuery", || r).map(|_| false),
        }
    }

    /// Waits, at most `limit`, for the work before the event: spins on the
    /// event for the first 100 µs (a chunk's copy takes tens), then polls.
    pub fn wait(&self, what: &'static str, limit: std::time::Duration) -> Result<()> {
        let start = std::time::Instant::now();
        while !self.done()? {
            let waited = start.elapsed();
            if waited >= limit {
                return Err(CudaError::Timeout {
                    what,
                    after_ms: limit.as_millis() as u64,
                });
            }
            if waited < std::time::Duration::from_micros(100) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
        Ok(())
    }

    /// Waits for the work before the event.
    pub fn sync(&self) -> Result<()> {
        // SAFETY: a live event.
        ck("cuEventSynchronize", || unsafe {
            sys::cuEventSynchronize(self.e)
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: created in new(); destroyed once.
            let _ = ck("cuEventDestroy", || unsafe {
                sys::cuEventDestroy_v2(self.e)
            });
        }
    }
}

/// Milliseconds the work queued by `f` on `stream` takes, timed with events.
pub fn time_on(stream: &Stream, f: impl FnOnce(&Stream) -> Result<()>) -> Result<f32> {
    let mut a = std::ptr::null_mut();
    let mut b = std::ptr::null_mut();
    // SAFETY: writes one event handle into `a`.
    ck("cuEventCreate", || unsafe { sys::cuEventCreate(&mut a, 0) })?;
    // SAFETY: writes one event handle into `b`.
    ck("cuEventCreate", || unsafe { sys::cuEventCreate(&mut b, 0) })?;
    let out = (|| {
        // SAFETY: `a` was created above and the stream is live.
        ck("cuEventRecord", || unsafe {
            sys::cuEventRecord(a, stream.raw())
        })?;
        f(stream)?;
        // SAFETY: `b` was created above and the stream is live.
        ck("cuEventRecord", || unsafe {
            sys::cuEventRecord(b, stream.raw())
        })?;
        // SAFETY: `b` is a live event, recorded above.
        ck("cuEventSynchronize", || unsafe {
            sys::cuEventSynchronize(b)
        })?;
        let mut ms = 0f32;
        // SAFETY: both events are live and complete; writes one f32 into `ms`.
        ck("cuEventElapsedTime", || unsafe {
            sys::cuEventElapsedTime_v2(&mut ms, a, b)
        })?;
        Ok(ms)
    })();
    // SAFETY: created above; destroyed once.
    unsafe {
        let _ = sys::cuEventDestroy_v2(a);
        let _ = sys::cuEventDestroy_v2(b);
    }
    out
}
