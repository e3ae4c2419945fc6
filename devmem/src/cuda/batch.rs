//! Many copies as one piece of GPU work, for gathering small buffers into a
//! contiguous one and scattering them back out (the NIXL plugin's packed
//! descriptors): one launch of the NVRTC copy-list kernel
//! ([`Unpacker::launch_list`]), else the driver's `cuMemcpyBatchAsync` where
//! it has one (CUDA 12.8 and later, looked up at run time with
//! `cuGetProcAddress`, in either ABI), else one `cuMemcpyAsync` per copy
//! ([`best`] says why in that order). One event marks the end of the whole
//! batch, whatever the method.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use super::mem::{Event, PinnedBuffer, Stream};
use super::unpack::{Frag, Unpacker};
use super::{ck, sys, Context, CudaError, Result};

/// How a [`CopyList`] is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `cuMemcpyBatchAsync`: one driver call for the batch.
    Driver,
    /// One launch of the copy-list kernel: device memory of the list's GPU.
    Kernel,
    /// One `cuMemcpyAsync` per copy: any memory CUDA addresses (another GPU too).
    Each,
}

/// Largest piece one kernel block copies: a few large copies still spread
/// over many multiprocessors.
const KERNEL_PIECE: u64 = 64 << 10;

/// `cuMemcpyBatchAsync` as CUDA 13 declares it (`_v2`: no `failIdx`).
type BatchV13 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    sys::CUstream,
) -> sys::CUresult;
/// `cuMemcpyBatchAsync` as CUDA 12.8 declares it.
type BatchV12 = unsafe extern "C" fn(
    *mut sys::CUdeviceptr,
    *mut sys::CUdeviceptr,
    *mut usize,
    usize,
    *mut sys::CUmemcpyAttributes,
    *mut usize,
    usize,
    *mut usize,
    sys::CUstream,
) -> sys::CUresult;

#[derive(Clone, Copy)]
enum BatchFn {
    V13(BatchV13),
    V12(BatchV12),
}

/// The driver's batched copy in the newest ABI it offers, looked up once.
fn batch_fn() -> Option<BatchFn> {
    static F: OnceLock<Option<BatchFn>> = OnceLock::new();
    *F.get_or_init(|| {
        let v13 = proc_address(13000).map(|p| {
            // SAFETY: for CUDA version 13000 the driver returns the symbol's
            // 13.0 ABI, which BatchV13 declares.
            BatchFn::V13(unsafe { std::mem::transmute::<*mut c_void, BatchV13>(p) })
        });
        let found = v13.or_else(|| {
            proc_address(12080).map(|p| {
                // SAFETY: for version 12080 the driver returns the 12.8 ABI,
                // which BatchV12 declares.
                BatchFn::V12(unsafe { std::mem::transmute::<*mut c_void, BatchV12>(p) })
            })
        });
        tracing::debug!(
            "cuMemcpyBatchAsync: {}",
            match found {
                Some(BatchFn::V13(_)) => "CUDA 13 ABI",
                Some(BatchFn::V12(_)) => "CUDA 12.8 ABI",
                None => "absent (copy-list kernel instead)",
            }
        );
        found
    })
}

fn proc_address(version: i32) -> Option<*mut c_void> {
    let mut p: *mut c_void = std::ptr::null_mut();
    let mut status = sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    // SAFETY: the name is NUL-terminated; writes one pointer and one status.
    let r = ck("cuGetProcAddress", || unsafe {
        sys::cuGetProcAddress_v2(
            c"cuMemcpyBatchAsync".as_ptr(),
            &mut p,
            version,
            0,
            &mut status,
        )
    });
    let found = status == sys::CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SUCCESS;
    (r.is_ok() && found && !p.is_null()).then_some(p)
}

/// Set when the driver's batched copy failed once: the process uses the
/// kernel from then on rather than fail transfers on a driver quirk.
static DRIVER_REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether the driver has a batched copy this process may use.
pub fn driver_available() -> bool {
    batch_fn().is_some() && !DRIVER_REFUSED.load(Ordering::Relaxed)
}

/// The fastest method this process has for device memory of `ctx`'s GPU:
/// the copy-list kernel, the driver's batched copy only where the kernel
/// cannot be built (no NVRTC). On an H200 with CUDA 13 (`tcpx-gpu-bench`,
/// `batched_gather`) the kernel gathers 128 x 8 KiB in 13 us where
/// `cuMemcpyBatchAsync` takes 580 us (as slow as a call per copy), and
/// 4 x 1 MiB in 15 against 24 us.
pub fn best(ctx: &'static Context) -> Method {
    if Unpacker::shared(ctx).is_ok() {
        Method::Kernel
    } else if driver_available() {
        Method::Driver
    } else {
        Method::Each
    }
}

/// A list of copies, run as one batch (see the module docs). Contiguous
/// neighbours merge as they are pushed.
pub struct CopyList {
    ctx: &'static Context,
    dsts: Vec<sys::CUdeviceptr>,
    srcs: Vec<sys::CUdeviceptr>,
    lens: Vec<usize>,
    /// The kernel's rows, in pinned memory the device reads directly.
    rows: Option<PinnedBuffer>,
    done: Event,
}

impl CopyList {
    pub fn new(ctx: &'static Context) -> Result<Self> {
        Ok(CopyList {
            ctx,
            dsts: Vec::new(),
            srcs: Vec::new(),
            lens: Vec::new(),
            rows: None,
            done: Event::new(ctx)?,
        })
    }

    /// Adds the copy of `len` bytes from `src` to `dst`.
    pub fn push(&mut self, dst: u64, src: u64, len: usize) {
        if len == 0 {
            return;
        }
        if let (Some(d), Some(s), Some(l)) =
            (self.dsts.last(), self.srcs.last(), self.lens.last_mut())
        {
            if *d + *l as u64 == dst && *s + *l as u64 == src {
                *l += len;
                return;
            }
        }
        self.dsts.push(dst);
        self.srcs.push(src);
        self.lens.push(len);
    }

    /// Copies in the list (after merging).
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    pub fn clear(&mut self) {
        self.dsts.clear();
        self.srcs.clear();
        self.lens.clear();
    }

    /// Queues every copy on `stream` by `how` and waits, at most `limit`,
    /// until all are done. A driver that refuses its batched copy is not
    /// asked again: the batch runs on the kernel (or a call per copy)
    /// instead, logged once.
    ///
    /// # Safety
    /// Every range must be memory the method can address (for `Driver` and
    /// `Kernel`: device memory of this list's GPU; for `Each`: any memory
    /// CUDA addresses), valid, and written by nothing else until this
    /// returns; no destination may overlap another copy's range. After a
    /// `Timeout` error the copies may still be running.
    pub unsafe fn run(&mut self, stream: &Stream, how: Method, limit: Duration) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        self.ctx.make_current()?;
        let queued = match how {
            Method::Driver => match self.queue_driver(stream) {
                Err(e) => {
                    // Whatever the failed call queued ends before the kernel
                    // copies the same bytes again.
                    stream.sync()?;
                    if !DRIVER_REFUSED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("cuMemcpyBatchAsync failed ({e}); batched copies do without it from now on");
                    }
                    if Unpacker::shared(self.ctx).is_ok() {
                        self.queue_kernel(stream)
                    } else {
                        self.queue_each(stream)
                    }
                }
                ok => ok,
            },
            Method::Kernel => self.queue_kernel(stream),
            Method::Each => self.queue_each(stream),
        };
        // If the event cannot be recorded, what was queued must still end
        // before the caller reuses the buffers.
        let recorded = queued.and_then(|()| self.done.record(stream));
        if let Err(e) = recorded {
            stream.sync()?;
            return Err(e);
        }
        let waited = self.done.wait("batched CUDA copy", limit);
        if let Err(CudaError::Timeout { .. }) = waited {
            // The kernel may still read the rows: never free or reuse them.
            std::mem::forget(self.rows.take());
        }
        waited
    }

    fn queue_driver(&mut self, stream: &Stream) -> Result<()> {
        let f = batch_fn().ok_or_else(|| CudaError::Driver {
            call: "cuMemcpyBatchAsync",
            name: "not in this driver".into(),
        })?;
        let loc = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_INVALID,
            id: 0,
        };
        let mut attr = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: loc,
            dstLocHint: loc,
            flags: 0,
        };
        let mut first = 0usize;
        let mut fail = usize::MAX;
        let n = self.lens.len();
        let (d, s, l) = (
            self.dsts.as_mut_ptr(),
            self.srcs.as_mut_ptr(),
            self.lens.as_mut_ptr(),
        );
        // SAFETY: three arrays of n entries, one attribute for all copies
        // (from index 0); the ranges are the caller's contract.
        ck("cuMemcpyBatchAsync", || unsafe {
            match f {
                BatchFn::V13(f) => f(d, s, l, n, &mut attr, &mut first, 1, stream.raw()),
                BatchFn::V12(f) => f(
                    d,
                    s,
                    l,
                    n,
                    &mut attr,
                    &mut first,
                    1,
                    &mut fail,
                    stream.raw(),
                ),
            }
        })
    }

    fn queue_kernel(&mut self, stream: &Stream) -> Result<()> {
        let un = Unpacker::shared(self.ctx)?;
        let mut rows = Vec::with_capacity(self.lens.len());
        for ((&d, &s), &l) in self.dsts.iter().zip(&self.srcs).zip(&self.lens) {
            let mut at = 0u64;
            while at < l as u64 {
                let n = (l as u64 - at).min(KERNEL_PIECE);
                rows.push(Frag::new(s + at, d + at, n as u32));
                at += n;
            }
        }
        let bytes = std::mem::size_of_val(rows.as_slice());
        if self.rows.as_ref().is_none_or(|r| r.len() < bytes) {
            self.rows = Some(PinnedBuffer::alloc(self.ctx, bytes.next_power_of_two())?);
        }
        let buf = self
            .rows
            .as_ref()
            .ok_or_else(|| CudaError::InvalidArgument("no row buffer".into()))?;
        // SAFETY: the buffer holds at least `bytes`; no copy of an earlier
        // run reads it any more (run waited for it, or dropped the buffer).
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr().cast::<u8>(), buf.as_ptr(), bytes) };
        // SAFETY: pinned host memory is device-readable at the same address
        // under unified addressing; rows stay untouched until run's wait.
        unsafe { un.launch_list(stream, buf.as_ptr() as u64, rows.len() as u32) }
    }

    fn queue_each(&mut self, stream: &Stream) -> Result<()> {
        for ((&d, &s), &l) in self.dsts.iter().zip(&self.srcs).zip(&self.lens) {
            // SAFETY: the caller's contract; unified addressing resolves
            // either end's memory kind.
            ck("cuMemcpyAsync", || unsafe {
                sys::cuMemcpyAsync(d, s, l, stream.raw())
            })?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CopyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CopyList({} copies)", self.lens.len())
    }
}
