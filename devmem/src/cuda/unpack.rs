//! The unpack kernel: gathers `(pool offset, destination offset, length)`
//! fragments from an RX pool into a destination buffer, on a stream; and its
//! sibling over absolute addresses, the copy-list kernel behind
//! [`super::batch`]. Compiled at run time with NVRTC (no toolkit needed at
//! build time).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

use super::mem::{DeviceBuffer, DeviceMem, Stream};
use super::{ck, sys, Context, CudaError, Result};

/// One fragment, as the kernel reads it (16-byte aligned rows).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frag {
    pub src: u64,
    pub dst: u64,
    pub len: u32,
    pub pad: u32,
}

impl Frag {
    pub fn new(src: u64, dst: u64, len: u32) -> Self {
        Frag {
            src,
            dst,
            len,
            pad: 0,
        }
    }
}

const SOURCE: &str = r#"
struct Frag { unsigned long long src, dst; unsigned int len, pad; };
// One block per fragment (grid-stride). When source and destination share
// their alignment mod 16, copy 16-byte words between byte-wise edges.
extern "C" __global__ void tcpx_unpack(const unsigned char* __restrict__ pool,
                                       unsigned char* __restrict__ out,
                                       const Frag* __restrict__ frags,
                                       unsigned int n) {
  for (unsigned int f = blockIdx.x; f < n; f += gridDim.x) {
    const Frag fr = frags[f];
    const unsigned char* s = pool + fr.src;
    unsigned char* d = out + fr.dst;
    const unsigned long long len = fr.len;
    unsigned long long done = 0;
    if ((((unsigned long long)s ^ (unsigned long long)d) & 15) == 0) {
      unsigned long long head = (16 - ((unsigned long long)d & 15)) & 15;
      if (head > len) head = len;
      if (threadIdx.x < head) d[threadIdx.x] = s[threadIdx.x];
      const unsigned long long nvec = (len - head) >> 4;
      const uint4* s4 = (const uint4*)(s + head);
      uint4* d4 = (uint4*)(d + head);
      for (unsigned long long i = threadIdx.x; i < nvec; i += blockDim.x) d4[i] = s4[i];
      done = head + (nvec << 4);
    }
    for (unsigned long long i = done + threadIdx.x; i < len; i += blockDim.x) d[i] = s[i];
  }
}
// The same gather over absolute addresses: `rows` (readable by the device,
// pinned host memory under unified addressing) names each copy's source and
// destination.
extern "C" __global__ void tcpx_copy_list(const Frag* __restrict__ rows, unsigned int n) {
  for (unsigned int f = blockIdx.x; f < n; f += gridDim.x) {
    const Frag fr = rows[f];
    const unsigned char* s = (const unsigned char*)fr.src;
    unsigned char* d = (unsigned char*)fr.dst;
    const unsigned long long len = fr.len;
    unsigned long long done = 0;
    if ((((unsigned long long)s ^ (unsigned long long)d) & 15) == 0) {
      unsigned long long head = (16 - ((unsigned long long)d & 15)) & 15;
      if (head > len) head = len;
      if (threadIdx.x < head) d[threadIdx.x] = s[threadIdx.x];
      const unsigned long long nvec = (len - head) >> 4;
      const uint4* s4 = (const uint4*)(s + head);
      uint4* d4 = (uint4*)(d + head);
      for (unsigned long long i = threadIdx.x; i < nvec; i += blockDim.x) d4[i] = s4[i];
      done = head + (nvec << 4);
    }
    for (unsigned long long i = done + threadIdx.x; i < len; i += blockDim.x) d[i] = s[i];
  }
}
"#;

const THREADS: u32 = 256;

/// Compiles CUDA C `source` with NVRTC for `ctx`'s device and loads it
/// there (`what` names it in errors); the caller unloads it.
pub(crate) fn load_module(
    ctx: &'static Context,
    source: &str,
    what: &str,
) -> Result<sys::CUmodule> {
    // SAFETY: dlopen probe only.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
        .unwrap_or(false);
    if !present {
        return Err(CudaError::Nvrtc("libnvrtc.so not found by dlopen".into()));
    }
    let major =
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor =
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        ..Default::default()
    };
    let ptx = std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(source, opts))
        .map_err(|_| CudaError::Nvrtc("NVRTC symbols missing".into()))?
        .map_err(|e| CudaError::Nvrtc(format!("compiling {what}: {e:?}")))?;
    let src = CString::new(ptx.to_src())
        .map_err(|_| CudaError::Nvrtc("PTX contains a NUL byte".into()))?;
    ctx.make_current()?;
    let mut module = std::ptr::null_mut();
    // SAFETY: src is NUL-terminated PTX text alive for the call.
    ck("cuModuleLoadData", || unsafe {
        sys::cuModuleLoadData(&mut module, src.as_ptr().cast())
    })?;
    Ok(module)
}

/// The kernel `name` of a loaded module.
pub(crate) fn function(module: sys::CUmodule, name: &std::ffi::CStr) -> Result<sys::CUfunction> {
    let mut func = std::ptr::null_mut();
    // SAFETY: module is loaded; name is NUL-terminated.
    ck("cuModuleGetFunction", || unsafe {
        sys::cuModuleGetFunction(&mut func, module, name.as_ptr())
    })?;
    Ok(func)
}

/// The compiled kernel, loaded in a context.
#[derive(Debug)]
pub struct Unpacker {
    ctx: &'static Context,
    module: sys::CUmodule,
    func: sys::CUfunction,
    copy_list: sys::CUfunction,
}

// SAFETY: module and function handles are usable from any thread with the context current.
unsafe impl Send for Unpacker {}
// SAFETY: launching is thread-safe in the driver; the struct is immutable.
unsafe impl Sync for Unpacker {}

impl Unpacker {
    /// Compiles the kernel with NVRTC for the device's architecture and loads it.
    pub fn new(ctx: &'static Context) -> Result<Self> {
        let module = load_module(ctx, SOURCE, "the unpack kernel")?;
        Ok(Unpacker {
            ctx,
            module,
            func: function(module, c"tcpx_unpack")?,
            copy_list: function(module, c"tcpx_copy_list")?,
        })
    }

    /// The kernel for `ctx`, compiled on first use and kept for the
    /// process's life (NVRTC takes a good fraction of a second).
    pub fn shared(ctx: &'static Context) -> Result<&'static Unpacker> {
        static KERNELS: OnceLock<Mutex<HashMap<i32, &'static Unpacker>>> = OnceLock::new();
        let mut map = KERNELS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(u) = map.get(&ctx.ordinal()) {
            return Ok(u);
        }
        let u: &'static Unpacker = Box::leak(Box::new(Unpacker::new(ctx)?));
        map.insert(ctx.ordinal(), u);
        Ok(u)
    }

    /// The context the kernel is loaded in.
    pub fn context(&self) -> &'static Context {
        self.ctx
    }

    /// Queues the gather of `n` fragments (a device array of [`Frag`] at
    /// `frags`) from `pool` into `out` on `stream`. Ranges are not checked
    /// here: [`Unpacker::check`] does that on the host copy of the list.
    ///
    /// # Safety
    /// Every fragment must lie inside `pool` and `out`, and the three device
    /// ranges must stay valid until the stream is synced.
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        pool: u64,
        out: u64,
        frags: u64,
        n: u32,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.ctx.make_current()?;
        let (mut pool, mut out, mut frags, mut n_arg) = (pool, out, frags, n);
        let mut params: [*mut c_void; 4] = [
            (&mut pool as *mut u64).cast(),
            (&mut out as *mut u64).cast(),
            (&mut frags as *mut u64).cast(),
            (&mut n_arg as *mut u32).cast(),
        ];
        let grid = n.min(1 << 20);
        // SAFETY: params point at live locals matching the kernel's signature.
        ck("cuLaunchKernel(tcpx_unpack)", || unsafe {
            sys::cuLaunchKernel(
                self.func,
                grid,
                1,
                1,
                THREADS,
                1,
                1,
                0,
                stream.raw(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// Queues the copies of `n` rows (an array of [`Frag`] at `rows`, whose
    /// `src` and `dst` are device addresses) on `stream`.
    ///
    /// # Safety
    /// `rows` must be readable by the device (device memory, or pinned host
    /// memory under unified addressing) and every row's ranges device memory
    /// this GPU can access, none overlapping another's destination; all of
    /// it must stay valid, and the rows unchanged, until the stream is synced.
    pub unsafe fn launch_list(&self, stream: &Stream, rows: u64, n: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.ctx.make_current()?;
        let (mut rows, mut n_arg) = (rows, n);
        let mut params: [*mut c_void; 2] = [
            (&mut rows as *mut u64).cast(),
            (&mut n_arg as *mut u32).cast(),
        ];
        let grid = n.min(1 << 20);
        // SAFETY: params point at live locals matching the kernel's signature.
        ck("cuLaunchKernel(tcpx_copy_list)", || unsafe {
            sys::cuLaunchKernel(
                self.copy_list,
                grid,
                1,
                1,
                THREADS,
                1,
                1,
                0,
                stream.raw(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// Checks that every fragment fits `pool_len` and `out_len`.
    pub fn check(frags: &[Frag], pool_len: usize, out_len: usize) -> Result<()> {
        for (i, f) in frags.iter().enumerate() {
            let ok = f
                .src
                .checked_add(f.len as u64)
                .is_some_and(|e| e <= pool_len as u64)
                && f.dst
                    .checked_add(f.len as u64)
                    .is_some_and(|e| e <= out_len as u64);
            if !ok {
                return Err(CudaError::InvalidArgument(format!(
                    "fragment {i} {f:?} outside pool ({pool_len}) or output ({out_len})"
                )));
            }
        }
        Ok(())
    }

    /// Checked gather: uploads `frags` to `scratch`, launches and syncs.
    pub fn gather(
        &self,
        stream: &Stream,
        pool: &(impl DeviceMem + ?Sized),
        out: &(impl DeviceMem + ?Sized),
        frags: &[Frag],
        scratch: &DeviceBuffer,
    ) -> Result<()> {
        Self::check(frags, pool.device_len(), out.device_len())?;
        let bytes = std::mem::size_of_val(frags);
        if bytes > scratch.len() {
            return Err(CudaError::InvalidArgument(format!(
                "{} fragments need {bytes} bytes of scratch, have {}",
                frags.len(),
                scratch.len()
            )));
        }
        // SAFETY: Frag is repr(C) plain data; the view covers exactly the slice.
        let raw = unsafe { std::slice::from_raw_parts(frags.as_ptr().cast::<u8>(), bytes) };
        scratch.write(0, raw)?;
        // SAFETY: ranges checked above; buffers outlive the sync below.
        unsafe {
            self.launch(
                stream,
                pool.device_ptr(),
                out.device_ptr(),
                scratch.ptr(),
                frags.len() as u32,
            )?
        };
        stream.sync()
    }
}

impl Drop for Unpacker {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: loaded in new(); unloaded once.
            let _ = ck("cuModuleUnload", || unsafe {
                sys::cuModuleUnload(self.module)
            });
        }
    }
}

/// The CPU reference: what [`Unpacker::gather`] must produce.
pub fn gather_cpu(pool: &[u8], out: &mut [u8], frags: &[Frag]) {
    for f in frags {
        let (s, d, l) = (f.src as usize, f.dst as usize, f.len as usize);
        out[d..d + l].copy_from_slice(&pool[s..s + l]);
    }
}
