//! A kernel that waits on the GPU for a word to change, as NCCL's kernels
//! wait for received data: for tests that check that a transport's data
//! path never waits for such a kernel (which only ends once the data is
//! there). It ends on the word, on the host's abort, or at its own
//! deadline (`%globaltimer`), so no test can hang the GPU forever.

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::time::{Duration, Instant};

use super::mem::{PinnedBuffer, Stream};
use super::unpack::{function, load_module};
use super::{ck, sys, Context, CudaError, Result};

const SOURCE: &str = r#"
// ctl[0]: the host's abort; ctl[1]: the outcome (1 seen, 2 aborted, 3 timed
// out); ctl[2]: set once the kernel runs. ctl is pinned host memory.
extern "C" __global__ void tcpx_spin_until(const volatile unsigned long long* word,
                                           unsigned long long want,
                                           volatile unsigned int* ctl,
                                           unsigned long long limit_ns) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  ctl[2] = 1;
  __threadfence_system();
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  unsigned int out = 3;
  for (;;) {
    if (*word == want) { out = 1; break; }
    if (ctl[0] != 0) { out = 2; break; }
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 > limit_ns) break;
  }
  ctl[1] = out;
  __threadfence_system();
}
"#;

/// How a spin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpinOutcome {
    /// The word took the awaited value.
    Seen,
    /// The host called [`Spin::abort`].
    Aborted,
    /// The kernel's own deadline passed.
    TimedOut,
}

/// The compiled kernel, loaded in one context.
#[derive(Debug)]
pub struct Spinner {
    ctx: &'static Context,
    module: sys::CUmodule,
    func: sys::CUfunction,
}

impl Spinner {
    /// Compiles the kernel with NVRTC and loads it in `ctx`.
    pub fn new(ctx: &'static Context) -> Result<Self> {
        let module = load_module(ctx, SOURCE, "the spin kernel")?;
        Ok(Spinner {
            ctx,
            module,
            func: function(module, c"tcpx_spin_until")?,
        })
    }

    /// Queues one thread that spins until the 8-byte word at device address
    /// `word` equals `want`, [`Spin::abort`] is called, or `limit` passes.
    ///
    /// # Safety
    /// `word` must be 8-byte aligned memory the device can read (device
    /// memory, or pinned host memory) that stays valid until the kernel ended.
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        word: u64,
        want: u64,
        limit: Duration,
    ) -> Result<Spin> {
        if word % 8 != 0 {
            return Err(CudaError::InvalidArgument(format!(
                "the awaited word at {word:#x} is not 8-byte aligned"
            )));
        }
        let ctl = PinnedBuffer::alloc(self.ctx, 16)?;
        // SAFETY: 16 freshly allocated bytes, not yet shared with the device.
        unsafe { std::ptr::write_bytes(ctl.as_ptr(), 0, 16) };
        self.ctx.make_current()?;
        let (mut w, mut v, mut c, mut l) = (
            word,
            want,
            ctl.as_ptr() as u64,
            limit.as_nanos().min(u64::MAX as u128) as u64,
        );
        let mut params: [*mut c_void; 4] = [
            (&mut w as *mut u64).cast(),
            (&mut v as *mut u64).cast(),
            (&mut c as *mut u64).cast(),
            (&mut l as *mut u64).cast(),
        ];
        // SAFETY: params point at live locals matching the kernel's
        // signature; ctl is pinned (device-readable under unified
        // addressing) and outlives the kernel (Spin's drop waits for it).
        ck("cuLaunchKernel(tcpx_spin_until)", || unsafe {
            sys::cuLaunchKernel(
                self.func,
                1,
                1,
                1,
                32,
                1,
                1,
                0,
                stream.raw(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })?;
        Ok(Spin {
            ctl: ManuallyDrop::new(ctl),
            limit,
        })
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: loaded in new(); unloaded once. A module's kernels
            // must have ended: Spin borrows nothing, so callers drop Spins
            // first (their drop waits for the kernel).
            let _ = ck("cuModuleUnload", || unsafe {
                sys::cuModuleUnload(self.module)
            });
        }
    }
}

/// One launched spin: its control words, read and written without any
/// CUDA call (pinned host memory), so watching it never queues GPU work.
#[derive(Debug)]
pub struct Spin {
    ctl: ManuallyDrop<PinnedBuffer>,
    limit: Duration,
}

impl Spin {
    fn word(&self, i: usize) -> *mut u32 {
        // SAFETY: i < 3 and the buffer holds 16 bytes, 4-aligned.
        unsafe { self.ctl.as_ptr().cast::<u32>().add(i) }
    }

    /// True once the kernel runs.
    pub fn started(&self) -> bool {
        // SAFETY: a live, aligned word the kernel writes; volatile read.
        unsafe { std::ptr::read_volatile(self.word(2)) != 0 }
    }

    /// How it ended, or `None` while it spins.
    pub fn outcome(&self) -> Option<SpinOutcome> {
        // SAFETY: as in started().
        match unsafe { std::ptr::read_volatile(self.word(1)) } {
            1 => Some(SpinOutcome::Seen),
            2 => Some(SpinOutcome::Aborted),
            3 => Some(SpinOutcome::TimedOut),
            _ => None,
        }
    }

    /// Asks the kernel to stop.
    pub fn abort(&self) {
        // SAFETY: a live, aligned word the kernel reads; volatile write.
        unsafe { std::ptr::write_volatile(self.word(0), 1) };
    }

    /// Waits, at most `limit`, for the kernel to end.
    pub fn wait(&self, limit: Duration) -> Option<SpinOutcome> {
        let start = Instant::now();
        loop {
            if let Some(o) = self.outcome() {
                return Some(o);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Spin {
    fn drop(&mut self) {
        // The kernel writes ctl until it ends: stop it and wait (bounded by
        // its own deadline) before the memory goes back; never free it under
        // a kernel still running.
        self.abort();
        if self.wait(self.limit + Duration::from_secs(5)).is_some() {
            // SAFETY: dropped once, here; the kernel no longer touches it.
            unsafe { ManuallyDrop::drop(&mut self.ctl) };
        }
    }
}
