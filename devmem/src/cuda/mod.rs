//! CUDA through the driver API, loaded at run time (cudarc with dynamic
//! loading): the crate builds and runs on machines without CUDA, where
//! [`probe`] answers a typed [`CudaError`] instead of the panic cudarc gives
//! when `libcuda.so` is missing.
//!
//! - [`Context`]: a device's primary context, made current on every thread
//!   that touches GPU memory ([`Context::make_current`]);
//! - [`mem`]: pointer attributes, device and pinned buffers, streams, copies,
//!   DMA-BUF export;
//! - [`unpack`]: the NVRTC-compiled fragment gather kernel (and its
//!   copy-list sibling);
//! - [`batch`]: many copies as one batch (`cuMemcpyBatchAsync`, else the
//!   copy-list kernel), finished by one event;
//! - [`vmm`]: a GPU RX pool exported and imported as a POSIX-fd shareable
//!   handle (tcpgpudmarxd's `cu_ipc_memfd_exporter`);
//! - [`mirror`]: the emulated NIC's writes into such a pool;
//! - [`spin`]: a kernel that waits for a word, as NCCL's wait for data (tests).

use std::collections::HashMap;
use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

pub use cudarc::driver::sys;

pub mod batch;
pub mod mem;
pub mod mirror;
pub mod spin;
pub mod unpack;
pub mod vmm;

/// Environment variable that turns CUDA off even where a driver is present.
pub const DISABLE_ENV: &str = "TCPX_CUDA_DISABLE";

/// What can go wrong with CUDA. Variants say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    #[error("CUDA driver unavailable: {0}; install the NVIDIA driver (libcuda.so.1) or register host memory")]
    NoDriver(String),
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    #[error("{call} failed: {name}")]
    Driver { call: &'static str, name: String },
    #[error("NVRTC: {0}; put the CUDA toolkit's lib64 (libnvrtc.so) on LD_LIBRARY_PATH")]
    Nvrtc(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{what} did not finish within {after_ms} ms: the GPU is hung or busy with work that waits on this process")]
    Timeout { what: &'static str, after_ms: u64 },
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Runs one driver call; a missing symbol (cudarc panics) becomes `NoDriver`.
pub(crate) fn ck(call: &'static str, f: impl FnOnce() -> sys::CUresult) -> Result<()> {
    let r = catch_unwind(AssertUnwindSafe(f))
        .map_err(|_| CudaError::NoDriver(format!("{call} is missing from the loaded libcuda")))?;
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver {
            call,
            name: error_name(r),
        })
    }
}

fn error_name(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or leaves it null.
    let ok = catch_unwind(AssertUnwindSafe(|| unsafe {
        sys::cuGetErrorName(r, &mut p)
    }));
    match ok {
        Ok(sys::CUresult::CUDA_SUCCESS) if !p.is_null() => {
            // SAFETY: a NUL-terminated static string owned by the driver.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
        _ => format!("{r:?}"),
    }
}

/// Number of CUDA devices, or why CUDA is unusable here. Probed once: the
/// library is looked up with dlopen before any cudarc call can panic.
pub fn probe() -> Result<i32> {
    static PROBE: OnceLock<Result<i32>> = OnceLock::new();
    PROBE.get_or_init(probe_uncached).clone()
}

/// True when [`probe`] finds at least one device.
pub fn available() -> bool {
    probe().is_ok()
}

fn probe_uncached() -> Result<i32> {
    if std::env::var_os(DISABLE_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        return Err(CudaError::NoDriver(format!("{DISABLE_ENV} is set")));
    }
    // SAFETY: only tries dlopen on candidate names.
    let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(CudaError::NoDriver("libcuda.so not found by dlopen".into()));
    }
    // SAFETY: cuInit has no preconditions.
    ck("cuInit", || unsafe { sys::cuInit(0) }).map_err(|e| match e {
        CudaError::Driver { name, .. } => CudaError::NoDevice(format!("cuInit: {name}")),
        e => e,
    })?;
    let mut n = 0;
    // SAFETY: writes one int.
    ck("cuDeviceGetCount", || unsafe {
        sys::cuDeviceGetCount(&mut n)
    })?;
    if n <= 0 {
        return Err(CudaError::NoDevice("the driver reports 0 devices".into()));
    }
    Ok(n)
}

/// A device's primary context (retained once, for the process's lifetime).
#[derive(Debug)]
pub struct Context {
    ordinal: i32,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext handle may be used from any thread once made current there.
unsafe impl Send for Context {}
// SAFETY: as above; the struct is immutable.
unsafe impl Sync for Context {}

impl Context {
    /// The primary context of device `ordinal`, retained on first use and
    /// made current on the calling thread.
    pub fn get(ordinal: i32) -> Result<&'static Context> {
        static CTXS: OnceLock<Mutex<HashMap<i32, &'static Context>>> = OnceLock::new();
        let n = probe()?;
        if ordinal < 0 || ordinal >= n {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, {n} present"
            )));
        }
        let map = CTXS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&ordinal) {
            c.make_current()?;
            return Ok(c);
        }
        let mut dev = 0;
        // SAFETY: writes one handle.
        ck("cuDeviceGet", || unsafe {
            sys::cuDeviceGet(&mut dev, ordinal)
        })?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: writes one handle; the retain is never released (process lifetime).
        ck("cuDevicePrimaryCtxRetain", || unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })?;
        let c: &'static Context = Box::leak(Box::new(Context { ordinal, dev, ctx }));
        map.insert(ordinal, c);
        c.make_current()?;
        Ok(c)
    }

    /// Makes sure some context is current on this thread (pointer queries
    /// need one): keeps the caller's, else device 0's primary context. A
    /// process that drives one GPU thus never opens a context on another.
    pub fn ensure_any_current() -> Result<()> {
        if !Context::any_current()? {
            Context::get(0)?;
        }
        Ok(())
    }

    /// True when some context is current on the calling thread.
    pub fn any_current() -> Result<bool> {
        probe()?;
        let mut cur = std::ptr::null_mut();
        // SAFETY: writes one handle.
        ck("cuCtxGetCurrent", || unsafe {
            sys::cuCtxGetCurrent(&mut cur)
        })?;
        Ok(!cur.is_null())
    }

    /// The primary context of the GPU at PCI address `pci` (as gpumemd
    /// names it, e.g. `0000:04:00.0`).
    pub fn by_pci(pci: &str) -> Result<&'static Context> {
        let n = probe()?;
        let id = std::ffi::CString::new(pci)
            .map_err(|_| CudaError::InvalidArgument(format!("{pci:?} holds a NUL byte")))?;
        let mut dev = 0;
        // SAFETY: id is NUL-terminated; writes one handle.
        ck("cuDeviceGetByPCIBusId", || unsafe {
            sys::cuDeviceGetByPCIBusId(&mut dev, id.as_ptr())
        })
        .map_err(|e| CudaError::NoDevice(format!("no CUDA device at PCI address {pci}: {e}")))?;
        for ordinal in 0..n {
            let mut d = 0;
            // SAFETY: writes one handle.
            ck("cuDeviceGet", || unsafe {
                sys::cuDeviceGet(&mut d, ordinal)
            })?;
            if d == dev {
                return Context::get(ordinal);
            }
        }
        Err(CudaError::NoDevice(format!(
            "the device at PCI address {pci} has no ordinal"
        )))
    }

    /// The device's PCI address (`cuDeviceGetPCIBusId`, e.g. `0000:04:00.0`).
    pub fn pci_bus_id(&self) -> Result<String> {
        let mut buf = [0 as std::ffi::c_char; 32];
        // SAFETY: writes at most buf.len() bytes, NUL-terminated.
        ck("cuDeviceGetPCIBusId", || unsafe {
            sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, self.dev)
        })?;
        // SAFETY: the driver NUL-terminated the buffer (len includes room for it).
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Ok(s.to_string_lossy().to_lowercase())
    }

    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    pub fn device(&self) -> sys::CUdevice {
        self.dev
    }

    /// Makes this context current on the calling thread (a no-op when it is).
    pub fn make_current(&self) -> Result<()> {
        let mut cur = std::ptr::null_mut();
        // SAFETY: writes one handle.
        ck("cuCtxGetCurrent", || unsafe {
            sys::cuCtxGetCurrent(&mut cur)
        })?;
        if cur != self.ctx {
            // SAFETY: ctx is a retained primary context.
            ck("cuCtxSetCurrent", || unsafe {
                sys::cuCtxSetCurrent(self.ctx)
            })?;
        }
        Ok(())
    }

    /// Free and total device memory, in bytes (for leak checks).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.make_current()?;
        let (mut free, mut total) = (0, 0);
        // SAFETY: writes two usizes; this context is current.
        ck("cuMemGetInfo", || unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    /// An integer device attribute.
    pub fn attribute(&self, a: sys::CUdevice_attribute) -> Result<i32> {
        let mut v = 0;
        // SAFETY: writes one int.
        ck("cuDeviceGetAttribute", || unsafe {
            sys::cuDeviceGetAttribute(&mut v, a, self.dev)
        })?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_stable_and_typed() {
        // Either answer is fine; it must not panic and must not change.
        let a = probe();
        assert_eq!(a, probe());
        if let Err(e) = a {
            assert!(!e.to_string().is_empty());
        }
    }
}
