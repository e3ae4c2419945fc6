//! The receive side of an emulated devmem NIC on one data socket: payload
//! lands in the socket's RX pool, each receive's fragments are gathered into
//! its destination by a [`Gather`] backend, and the pool pages go back to
//! the NIC (token return) only once the gather that reads them has finished.
//!
//! Paths, by pool and destination:
//! - host pool, host memory (or a CUDA region's bounce staging): CPU gather,
//!   finished when it returns, tokens back at once;
//! - GPU pool, CUDA region on the pool's GPU: the CUDA unpack kernel, queued
//!   on the socket's own stream; the socket receives on while it runs;
//! - GPU pool, host memory (chunk headers, host regions, discarded bytes):
//!   one synchronous device-to-host copy per fragment: correct, slow for
//!   bulk data (the socket logs it once).
//!
//! The ordering that matters: a queued kernel still reads its pool pages, so
//! their tokens are held until its event fires. Returned earlier, the NIC
//! could land new payload in pages the kernel has not read yet. A request
//! completes only after [`DevmemRx::settle`], which waits for every kernel.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use devmem::cuda::mem::{DeviceBuffer, DeviceMem, DeviceSpan, Event, PinnedBuffer, Stream};
use devmem::cuda::unpack::Unpacker as Kernel;
use devmem::cuda::Context;
use devmem::emu::{EmuConfig, EmuDevmemSocket};
use devmem::pool::RxPool;
use devmem::sockabi::{
    control_buffer_len_for, parse_rx_into, release_tokens, DevmemSocket, Fragment, KernelAbi,
};
use devmem::unpack::{self, CpuUnpack, DeviceToHostUnpack, Frag, GatherPlan, Unpack};

use crate::bounce::cuda_error;
use crate::error::{Error, Result};
use crate::gpumemd::{PoolPart, PoolSource};
use crate::stats::Counters;

/// Linear (header-split miss) bytes one receive may carry.
const LINEAR_MAX: usize = 256;
/// Most bytes one receive asks for (its iov, which linear bytes land in).
const READ_MAX: usize = 256 << 10;
/// Most fragments one receive carries (its control buffer holds no more).
const MAX_FRAGS_PER_READ: usize = 64;
/// Gathers in flight per socket; the next receive waits for the oldest.
const MAX_INFLIGHT: usize = 16;
/// How long one gather may take: microseconds normally, so only a hung GPU
/// gets near it.
const GATHER_DEADLINE: Duration = Duration::from_secs(10);

/// Where one receive's bytes go.
pub(super) enum Dst<'a> {
    Host(&'a mut [u8]),
    Device(DeviceSpan),
}

impl Dst<'_> {
    fn len(&self) -> usize {
        match self {
            Dst::Host(d) => d.len(),
            Dst::Device(s) => s.device_len(),
        }
    }
}

/// A gather that finished during the call, or one still running in slot `n`
/// of its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fence {
    Done,
    Pending(usize),
}

/// Copies a receive's fragments into its destination, maybe asynchronously.
pub(super) trait Gather: Send {
    /// Starts copying `plan`'s pool rows (from `pool`) and linear rows (from
    /// `linear`) into `dst`. Until the fence is done the copy may still read
    /// `pool`, `linear` is free again on return.
    fn gather(
        &mut self,
        pool: &RxPool,
        linear: &[u8],
        plan: &GatherPlan,
        dst: Dst<'_>,
    ) -> Result<Fence>;
    /// Whether the gather in `slot` finished; a finished slot is reused.
    fn done(&mut self, slot: usize) -> Result<bool>;
    /// Waits at most `limit` for the gather in `slot` (`Error::Timeout`
    /// after); a finished slot is reused.
    fn wait(&mut self, slot: usize, limit: Duration) -> Result<()>;
}

/// What one receive did.
pub(super) enum Recv {
    Bytes(usize),
    /// The peer closed the stream.
    Closed,
    WouldBlock,
    Interrupted,
}

/// The emulated devmem NIC on one socket, its pool and its gathers.
pub(super) struct DevmemRx {
    emu: EmuDevmemSocket<TcpStream>,
    /// The part of gpumemd's pool this socket receives into, if shared.
    _part: Option<PoolPart>,
    linear: Vec<u8>,
    control: Vec<u8>,
    frags: Vec<Fragment>,
    plan: GatherPlan,
    gather: Box<dyn Gather>,
    /// Gathers still running, oldest first, with the tokens of the pool
    /// pages they read.
    inflight: VecDeque<(usize, Vec<u32>)>,
    spare: Vec<Vec<u32>>,
    counters: Arc<Counters>,
    deadline: Duration,
    /// A gather timed out: the GPU is stuck and later waits fail at once.
    hung: bool,
}

impl DevmemRx {
    pub fn new(
        stream: &TcpStream,
        abi: KernelAbi,
        source: PoolSource,
        counters: Arc<Counters>,
    ) -> Result<Self> {
        let dup = stream
            .try_clone()
            .map_err(|e| Error::io("dup data socket", e))?;
        let (pool, part) = match source {
            PoolSource::Local(bytes) => (RxPool::local(bytes).map_err(Error::devmem)?, None),
            PoolSource::Shared(shared) => {
                let (pool, part) = shared.take()?;
                (pool, Some(part))
            }
        };
        let gather = Box::new(PoolGather::new(&pool)?);
        let seed = stream.as_raw_fd() as u64;
        let emu = EmuDevmemSocket::new(dup, pool, EmuConfig::new(abi).with_seed(seed))
            .map_err(Error::devmem)?;
        Ok(DevmemRx {
            emu,
            _part: part,
            linear: vec![0; READ_MAX],
            // Sized for this ABI's cmsgs: a receive then never carries more
            // fragments than a GPU gather slot holds.
            control: vec![0; control_buffer_len_for(abi, MAX_FRAGS_PER_READ)],
            frags: Vec::new(),
            plan: GatherPlan::default(),
            gather,
            inflight: VecDeque::new(),
            spare: Vec::new(),
            counters,
            deadline: GATHER_DEADLINE,
            hung: false,
        })
    }

    /// The GPU of a GPU pool; `None` for host pools.
    pub fn gpu_ordinal(&self) -> Option<i32> {
        self.emu.pool().device().map(|m| m.context().ordinal())
    }

    /// One receive of at most `dst.len()` bytes into `dst`: parses the
    /// control bytes, starts the gather, and gives back the tokens of every
    /// gather that has finished. Accounting errors fail the socket.
    pub fn recv(&mut self, dst: Dst<'_>) -> Result<Recv> {
        self.reap()?;
        // A full pool (or every gather slot busy) frees up only as running
        // gathers finish: wait for the oldest rather than stall on the NIC.
        while !self.inflight.is_empty()
            && (self.emu.pool().free_pages() == 0 || self.inflight.len() >= MAX_INFLIGHT)
        {
            self.wait_oldest()?;
        }
        let lim = dst.len().min(self.linear.len());
        let out = match self
            .emu
            .recv_devmem(&mut self.linear[..lim], &mut self.control)
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Recv::WouldBlock),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Recv::Interrupted),
            Err(e) => return Err(Error::io("devmem recv", e)),
        };
        if out.bytes == 0 {
            return Ok(Recv::Closed);
        }
        self.frags.clear();
        parse_rx_into(
            self.emu.config().abi,
            &self.control[..out.control_len],
            out.bytes,
            out.msg_flags,
            &mut self.frags,
        )
        .map_err(Error::devmem)?;
        self.plan.clear();
        unpack::plan(&self.frags, self.linear.len(), 0, dst.len(), &mut self.plan)
            .map_err(Error::devmem)?;
        let fence = self
            .gather
            .gather(self.emu.pool(), &self.linear, &self.plan, dst)?;
        Counters::bump(&self.counters.devmem_frags, self.plan.pool.len() as u64);
        let linear: u64 = self.plan.linear.iter().map(|f| u64::from(f.len)).sum();
        Counters::bump(&self.counters.devmem_linear_bytes, linear);
        match fence {
            Fence::Done => {
                let tokens = std::mem::take(&mut self.plan.tokens);
                let r = self.release(&tokens);
                self.plan.tokens = tokens;
                r?;
            }
            Fence::Pending(slot) => {
                Counters::bump(&self.counters.devmem_kernels, 1);
                let mut tokens = self.spare.pop().unwrap_or_default();
                tokens.clear();
                tokens.extend_from_slice(&self.plan.tokens);
                self.inflight.push_back((slot, tokens));
            }
        }
        Ok(Recv::Bytes(out.bytes))
    }

    /// Waits for every running gather and gives its tokens back: afterwards
    /// every byte received so far is in its destination.
    pub fn settle(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }

    /// Settles before the socket's jobs let go of their memory (failure, drop).
    pub fn quiesce(&mut self) {
        if let Err(e) = self.settle() {
            tracing::error!(
                "devmem unpack did not finish ({e}); its destination may still be written"
            );
        }
    }

    /// Gives back the tokens of finished gathers, oldest first, without waiting.
    fn reap(&mut self) -> Result<()> {
        while let Some(&(slot, _)) = self.inflight.front() {
            if !self.gather.done(slot)? {
                break;
            }
            self.retire()?;
        }
        Ok(())
    }

    fn wait_oldest(&mut self) -> Result<()> {
        let Some(&(slot, _)) = self.inflight.front() else {
            return Ok(());
        };
        if self.hung {
            return Err(Error::Timeout {
                what: "devmem unpack (an earlier one timed out)".into(),
                after_ms: 0,
            });
        }
        if let Err(e) = self.gather.wait(slot, self.deadline) {
            self.hung |= matches!(e, Error::Timeout { .. });
            return Err(e);
        }
        self.retire()
    }

    /// The oldest gather finished: only now may its pages go back to the NIC.
    fn retire(&mut self) -> Result<()> {
        let Some((_, tokens)) = self.inflight.pop_front() else {
            return Ok(());
        };
        let r = self.release(&tokens);
        self.spare.push(tokens);
        r
    }

    fn release(&mut self, tokens: &[u32]) -> Result<()> {
        let report = release_tokens(&mut self.emu, tokens).map_err(Error::devmem)?;
        Counters::bump(&self.counters.devmem_tokens_returned, report.requested);
        Counters::bump(&self.counters.devmem_dontneed_calls, report.calls as u64);
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn set_gather(&mut self, g: Box<dyn Gather>, deadline: Duration) {
        self.gather = g;
        self.deadline = deadline;
    }

    #[cfg(test)]
    pub(super) fn pool(&self) -> &RxPool {
        self.emu.pool()
    }
}

impl Drop for DevmemRx {
    fn drop(&mut self) {
        // The pool (and the destinations) must outlive every running gather.
        self.quiesce();
    }
}

/// The backend the transport uses: CPU gathers for host pools, the CUDA
/// kernel (and device-to-host copies) for GPU pools.
struct PoolGather {
    gpu: Option<GpuGather>,
}

impl PoolGather {
    fn new(pool: &RxPool) -> Result<Self> {
        let gpu = match pool.device() {
            Some(m) => Some(GpuGather::new(m.context())?),
            None => None,
        };
        Ok(PoolGather { gpu })
    }
}

impl Gather for PoolGather {
    fn gather(
        &mut self,
        pool: &RxPool,
        linear: &[u8],
        plan: &GatherPlan,
        dst: Dst<'_>,
    ) -> Result<Fence> {
        match (dst, pool.host(), pool.device(), self.gpu.as_mut()) {
            (Dst::Host(d), host, dev, g) => {
                let rows = match (host, dev, g) {
                    (Some(host), _, _) => CpuUnpack.unpack(host, &mut *d, &plan.pool),
                    (None, Some(dev), Some(g)) => {
                        DeviceToHostUnpack { ctx: g.ctx }.unpack(dev, &mut *d, &plan.pool)
                    }
                    _ => {
                        return Err(Error::Unsupported(
                            "a GPU RX pool needs CUDA in this process".into(),
                        ))
                    }
                };
                rows.and_then(|_| CpuUnpack.unpack(linear, d, &plan.linear))
                    .map_err(Error::devmem)?;
                Ok(Fence::Done)
            }
            (Dst::Device(span), None, Some(dev), Some(g)) => {
                g.launch(dev, linear, plan, &span).map(Fence::Pending)
            }
            _ => Err(Error::Unsupported(
                "a host RX pool is not gathered into device memory directly; CUDA regions \
                 receive it through bounce staging"
                    .into(),
            )),
        }
    }

    fn done(&mut self, slot: usize) -> Result<bool> {
        match self.gpu.as_mut() {
            Some(g) => g.done(slot),
            None => Ok(true),
        }
    }

    fn wait(&mut self, slot: usize, limit: Duration) -> Result<()> {
        match self.gpu.as_mut() {
            Some(g) => g.wait(slot, limit),
            None => Ok(()),
        }
    }
}

/// Bytes of a slot's row list.
const ROWS_BYTES: usize = MAX_FRAGS_PER_READ * std::mem::size_of::<Frag>();

/// What one queued kernel needs until it finishes: its row list (pinned,
/// then on the device), the linear bytes it copies, and its event.
struct Slot {
    /// Rows, then linear bytes.
    host: PinnedBuffer,
    rows: DeviceBuffer,
    done: Event,
}

/// The CUDA side of a GPU pool's socket: the context's kernel, compiled
/// once per process, and a stream of the socket's own.
struct GpuGather {
    ctx: &'static Context,
    kernel: &'static Kernel,
    stream: Stream,
    slots: Vec<Slot>,
    free: Vec<usize>,
}

impl GpuGather {
    fn new(ctx: &'static Context) -> Result<Self> {
        Ok(GpuGather {
            ctx,
            kernel: Kernel::shared(ctx).map_err(cuda_error)?,
            stream: Stream::new(ctx).map_err(cuda_error)?,
            slots: Vec::new(),
            free: Vec::new(),
        })
    }

    fn take_slot(&mut self) -> Result<usize> {
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        if self.slots.len() >= MAX_INFLIGHT {
            return Err(Error::InvalidArgument(format!(
                "more than {MAX_INFLIGHT} devmem unpacks in flight on one socket"
            )));
        }
        let c = |e| cuda_error(e);
        self.slots.push(Slot {
            host: PinnedBuffer::alloc(self.ctx, ROWS_BYTES + LINEAR_MAX).map_err(c)?,
            rows: DeviceBuffer::alloc(self.ctx, ROWS_BYTES).map_err(c)?,
            done: Event::new(self.ctx).map_err(c)?,
        });
        Ok(self.slots.len() - 1)
    }

    /// Queues the kernel for the pool rows and copies for the linear rows;
    /// returns the slot whose event marks their end.
    fn launch(
        &mut self,
        pool: &(impl DeviceMem + ?Sized),
        linear: &[u8],
        plan: &GatherPlan,
        dst: &DeviceSpan,
    ) -> Result<usize> {
        unpack::check(&plan.pool, pool.device_len(), dst.device_len()).map_err(Error::devmem)?;
        unpack::check(&plan.linear, linear.len().min(LINEAR_MAX), dst.device_len())
            .map_err(Error::devmem)?;
        if plan.pool.len() > MAX_FRAGS_PER_READ {
            return Err(Error::Protocol(format!(
                "devmem unpack: {} pool fragments in one receive, at most {MAX_FRAGS_PER_READ}",
                plan.pool.len()
            )));
        }
        self.ctx.make_current().map_err(cuda_error)?;
        let i = self.take_slot()?;
        let slot = &self.slots[i];
        let rows_len = std::mem::size_of_val(plan.pool.as_slice());
        let lin_len = linear.len().min(LINEAR_MAX);
        // SAFETY: the slot is free, so no queued copy reads its pinned
        // memory; rows (at most ROWS_BYTES) and linear bytes (at most
        // LINEAR_MAX) fit it; Frag is plain repr(C) data.
        unsafe {
            let h = slot.host.as_ptr();
            std::ptr::copy_nonoverlapping(plan.pool.as_ptr().cast::<u8>(), h, rows_len);
            std::ptr::copy_nonoverlapping(linear.as_ptr(), h.add(ROWS_BYTES), lin_len);
        }
        let queued = (|| {
            let h = slot.host.as_ptr();
            if rows_len > 0 {
                // SAFETY: both ranges lie in the slot's buffers, which stay
                // untouched until the slot's event has fired.
                unsafe { self.stream.htod(slot.rows.ptr(), h, rows_len)? };
            }
            // SAFETY: every row lies inside the pool and the destination
            // (checked above); the pool outlives the socket's gathers
            // (DevmemRx settles before it drops) and the destination's
            // request holds its region until settled.
            unsafe {
                self.kernel.launch(
                    &self.stream,
                    pool.device_ptr(),
                    dst.device_ptr(),
                    slot.rows.ptr(),
                    plan.pool.len() as u32,
                )?
            };
            for r in &plan.linear {
                // SAFETY: the row lies inside the slot's linear bytes and the
                // destination (checked above); both live until the event.
                unsafe {
                    self.stream.htod(
                        dst.device_ptr() + r.dst,
                        h.add(ROWS_BYTES + r.src as usize),
                        r.len as usize,
                    )?
                };
            }
            slot.done.record(&self.stream)
        })();
        match queued {
            Ok(()) => Ok(i),
            Err(e) => {
                // Nothing queued may outlive the slot's reuse.
                let _ = self.stream.sync();
                self.free.push(i);
                Err(cuda_error(e))
            }
        }
    }

    fn slot(&self, slot: usize) -> Result<&Slot> {
        self.slots
            .get(slot)
            .ok_or_else(|| Error::InvalidArgument(format!("no devmem unpack slot {slot}")))
    }

    fn done(&mut self, slot: usize) -> Result<bool> {
        let done = self.slot(slot)?.done.done().map_err(cuda_error)?;
        if done {
            self.free.push(slot);
        }
        Ok(done)
    }

    fn wait(&mut self, slot: usize, limit: Duration) -> Result<()> {
        self.ctx.make_current().map_err(cuda_error)?;
        self.slot(slot)?
            .done
            .wait("devmem unpack kernel", limit)
            .map_err(cuda_error)?;
        self.free.push(slot);
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use devmem::pool::PAGE_SIZE;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A gather that copies on the CPU at once but reports its fences done
    /// only once the test allows: a kernel still running, under the test's
    /// control.
    #[derive(Clone, Default)]
    pub(in crate::engine) struct Manual {
        /// Gathers `0..finished` have finished.
        pub finished: Arc<AtomicUsize>,
        started: usize,
    }

    impl Manual {
        pub fn finish_all(&self) {
            self.finished.store(usize::MAX, Ordering::SeqCst);
        }
    }

    impl Gather for Manual {
        fn gather(
            &mut self,
            pool: &RxPool,
            linear: &[u8],
            plan: &GatherPlan,
            dst: Dst<'_>,
        ) -> Result<Fence> {
            let Dst::Host(d) = dst else {
                return Err(Error::Unsupported("test gathers into host memory".into()));
            };
            // What a GPU gather's slot holds.
            assert!(plan.pool.len() <= MAX_FRAGS_PER_READ, "{}", plan.pool.len());
            let host = pool.host().expect("a host pool");
            CpuUnpack.unpack(host, d, &plan.pool).unwrap();
            CpuUnpack.unpack(linear, d, &plan.linear).unwrap();
            self.started += 1;
            Ok(Fence::Pending(self.started - 1))
        }

        fn done(&mut self, slot: usize) -> Result<bool> {
            Ok(slot < self.finished.load(Ordering::SeqCst))
        }

        fn wait(&mut self, slot: usize, limit: Duration) -> Result<()> {
            let start = std::time::Instant::now();
            while !self.done(slot)? {
                if start.elapsed() > limit {
                    return Err(Error::Timeout {
                        what: "test gather".into(),
                        after_ms: limit.as_millis() as u64,
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        }
    }

    pub(in crate::engine) fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + i / 4093) as u8).collect()
    }

    /// A receiving socket with `bytes` already written to it by its peer
    /// (returned too: kept open, the receiver sees no end of stream). A read
    /// with nothing to read fails after a while instead of hanging the test.
    pub(in crate::engine) fn loaded(bytes: &[u8]) -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let rx = l.accept().unwrap().0;
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tx.write_all(bytes).unwrap();
        (rx, tx)
    }

    fn rx(stream: &TcpStream, pages: usize, gather: &Manual, deadline: Duration) -> DevmemRx {
        let counters = Arc::new(Counters::default());
        let mut d = DevmemRx::new(
            stream,
            KernelAbi::Upstream,
            PoolSource::Local(pages * PAGE_SIZE),
            counters,
        )
        .unwrap();
        d.set_gather(Box::new(gather.clone()), deadline);
        d
    }

    /// One receive of at most 8 KiB (a few pages) into `buf`.
    fn recv_into(d: &mut DevmemRx, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(8 << 10);
        match d.recv(Dst::Host(&mut buf[..n]))? {
            Recv::Bytes(n) => Ok(n),
            _ => panic!("the socket holds bytes"),
        }
    }

    #[test]
    fn tokens_go_back_only_after_the_gather_reading_their_pages_finished() {
        let data = pattern(40 << 10);
        let (stream, _peer) = loaded(&data);
        let m = Manual::default();
        let mut d = rx(&stream, 64, &m, Duration::from_secs(5));
        let mut got = vec![0u8; data.len()];
        let n1 = recv_into(&mut d, &mut got).unwrap();
        let first = d.pool().outstanding();
        assert!(!first.is_empty(), "a receive lent pool pages");
        assert_eq!(d.counters.devmem_tokens_returned.load(Ordering::SeqCst), 0);
        // The first gather still runs: a second receive keeps its tokens out.
        let n2 = recv_into(&mut d, &mut got[n1..]).unwrap();
        let both = d.pool().outstanding();
        assert!(first.iter().all(|t| both.contains(t)), "held while running");
        assert!(both.len() > first.len());
        // Once it finished, the next receive gives back exactly its tokens.
        m.finished.store(1, Ordering::SeqCst);
        let mut at = n1 + n2;
        at += recv_into(&mut d, &mut got[at..]).unwrap();
        let now = d.pool().outstanding();
        assert!(first.iter().all(|t| !now.contains(t)), "returned once done");
        assert!(both
            .iter()
            .filter(|t| !first.contains(t))
            .all(|t| now.contains(t)));
        // Settling waits for the rest and returns every token.
        m.finish_all();
        while at < data.len() {
            at += recv_into(&mut d, &mut got[at..]).unwrap();
        }
        d.settle().unwrap();
        assert!(d.pool().outstanding().is_empty());
        let c = &d.counters;
        assert_eq!(
            c.devmem_tokens_returned.load(Ordering::SeqCst),
            c.devmem_frags.load(Ordering::SeqCst)
        );
        assert!(got == data, "bytes differ");
    }

    #[test]
    fn a_full_pool_waits_for_the_oldest_gather_and_never_overwrites() {
        let data = pattern(64 << 10);
        // Never finishes: the receive after the pool filled times out, and
        // the pool still holds the unread pages.
        let (stream, _peer) = loaded(&data);
        let m = Manual::default();
        let mut d = rx(&stream, 2, &m, Duration::from_millis(50));
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while d.pool().free_pages() > 0 {
            at += recv_into(&mut d, &mut got[at..]).unwrap();
        }
        let held = d.pool().outstanding();
        let e = recv_into(&mut d, &mut got[at..]).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_eq!(d.pool().outstanding(), held, "no token went back early");
        assert!(d.settle().is_err(), "a stuck gather stays stuck");
        std::mem::forget(d); // its gather never ends: dropping would wait again

        // Finishing later: the waiting receive proceeds, byte-exact.
        let (stream, _peer) = loaded(&data);
        let m = Manual::default();
        let mut d = rx(&stream, 2, &m, Duration::from_secs(5));
        let done = Arc::new(AtomicBool::new(false));
        let (m2, done2) = (m.clone(), done.clone());
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            done2.store(true, Ordering::SeqCst);
            m2.finish_all();
        });
        let mut at = 0;
        while at < data.len() {
            let full = d.pool().free_pages() == 0;
            at += recv_into(&mut d, &mut got[at..]).unwrap();
            assert!(
                !full || done.load(Ordering::SeqCst),
                "received into a full pool"
            );
        }
        finisher.join().unwrap();
        d.settle().unwrap();
        assert!(got == data);
    }
}
