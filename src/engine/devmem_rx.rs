//! The devmem receive side of one data socket, over the [`DevmemSocket`]
//! seam (the kernel's devmem socket or the emulated NIC: the same code
//! above it): payload lands in the NIC's RX pool, each receive's fragments
//! are gathered into its destination by a [`Gather`] backend, and the pool
//! pages go back to the NIC (token return) only once the gather that reads
//! them has finished.
//!
//! Paths, by pool and destination:
//! - host pool, host memory (or a CUDA region's bounce staging): CPU gather,
//!   finished when it returns, tokens back at once;
//! - GPU pool, CUDA region on the pool's GPU: rows staged in an open batch
//!   (absolute source and destination, in pinned memory the kernel reads)
//!   and gathered by one copy-list kernel per batch on the socket's stream
//!   (an emulated pool's readers' stream), launched when the next rows do
//!   not fit, the socket would block or waits, the pool runs out, or a
//!   request settles; the socket receives on while it runs: a launch per
//!   receive cost more than the receive;
//! - GPU pool, host memory (chunk headers, host regions, discarded bytes):
//!   one synchronous device-to-host copy per fragment: correct, slow for
//!   bulk data (logged once).
//!
//! The ordering that matters: a queued kernel still reads its pool pages, so
//! their tokens are held until its event fires. Returned earlier, the NIC
//! could land new payload in pages the kernel has not read yet. A request
//! completes only after [`DevmemRx::settle`], which waits for every kernel.
//!
//! Every token the NIC lends is entered in a [`Ledger`] and leaves it once,
//! when it goes back: on the error paths (a receive that does not parse or
//! fit) as on the normal one, and on close for whatever is still held, so
//! a token is returned exactly once and never one the socket does not hold.

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devmem::cuda::mem::{DeviceMem, DeviceSpan, Event, PinnedBuffer, Stream};
use devmem::cuda::unpack::Unpacker as Kernel;
use devmem::cuda::Context;
use devmem::emu::{EmuConfig, EmuDevmemSocket};
use devmem::pool::RxPool;
use devmem::sockabi::{
    control_buffer_len_for, parse_rx_into, release_tokens, salvage_tokens, AbiError, DevmemSocket,
    Fragment, KernelSocket,
};
use devmem::unpack::{self, CpuUnpack, DeviceToHostUnpack, Frag, GatherPlan, Unpack};

use crate::bounce::cuda_error;
use crate::error::{Error, Result};
use crate::gpumemd::{PoolPart, PoolSource};
use crate::path::DevmemSpec;
use crate::stats::Counters;

/// Linear (header-split miss) bytes one receive may carry.
const LINEAR_MAX: usize = 256;
/// Most bytes one receive asks for (its iov, which linear bytes land in).
const READ_MAX: usize = 256 << 10;
/// Most fragments one receive carries (its control buffer holds no more).
const MAX_FRAGS_PER_READ: usize = 64;
/// Gathers in flight per socket; the next receive waits for the oldest.
const MAX_INFLIGHT: usize = 16;
/// Most rows one GPU batch gathers (4 KiB pages: 4 MiB); see [`batch_rows`].
const BATCH_ROWS: usize = 1024;
/// Linear bytes one GPU batch carries in its pinned memory.
const BATCH_LINEAR: usize = 16 << 10;
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

/// A gather that finished during the call, or one staged in the backend's
/// open batch, which runs once launched ([`Gather::launch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fence {
    Done,
    Batched,
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
    /// Whether `plan` fits the open batch; when it does not, the caller
    /// launches the batch before gathering `plan`.
    fn has_room(&self, plan: &GatherPlan) -> bool;
    /// Launches the open batch: the slot it runs in, `None` if none was open.
    fn launch(&mut self, pool: &RxPool) -> Result<Option<usize>>;
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

/// Tokens the NIC lent this socket and it has not given back: a multiset
/// (a kernel may lend one token for two fragments of a page).
#[derive(Default)]
struct Ledger {
    held: HashMap<u32, u32>,
}

impl Ledger {
    fn lend(&mut self, tokens: impl IntoIterator<Item = u32>) -> u64 {
        let mut n = 0;
        for t in tokens {
            *self.held.entry(t).or_default() += 1;
            n += 1;
        }
        n
    }

    /// Takes `tokens` out; those it does not hold (already returned) are
    /// dropped from `tokens` and counted.
    fn give_back(&mut self, tokens: &mut Vec<u32>) -> u64 {
        let before = tokens.len();
        tokens.retain(|t| match self.held.get_mut(t) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.held.remove(t);
                true
            }
            None => false,
        });
        (before - tokens.len()) as u64
    }

    fn take_all(&mut self) -> Vec<u32> {
        self.held
            .drain()
            .flat_map(|(t, n)| std::iter::repeat_n(t, n as usize))
            .collect()
    }
}

/// The process logs once that a devmem socket receives linear bytes only.
static ALL_LINEAR_LOGGED: AtomicBool = AtomicBool::new(false);

/// One data socket's devmem receive: its socket (kernel or emulated), pool
/// and gathers.
pub(super) struct DevmemRx {
    sock: Box<dyn DevmemSocket>,
    /// The part of gpumemd's pool this socket receives into, if shared.
    _part: Option<PoolPart>,
    /// Upstream: the binding id every pool fragment must carry.
    dmabuf_id: Option<u32>,
    linear: Vec<u8>,
    control: Vec<u8>,
    frags: Vec<Fragment>,
    plan: GatherPlan,
    gather: Box<dyn Gather>,
    /// Gathers still running, oldest first, with the tokens of the pool
    /// pages they read.
    inflight: VecDeque<(usize, Vec<u32>)>,
    /// Tokens of the pages the open batch reads.
    open: Vec<u32>,
    spare: Vec<Vec<u32>>,
    ledger: Ledger,
    counters: Arc<Counters>,
    deadline: Duration,
    /// A gather timed out: the GPU is stuck and later waits fail at once.
    hung: bool,
}

impl DevmemRx {
    pub fn new(stream: &TcpStream, spec: DevmemSpec, counters: Arc<Counters>) -> Result<Self> {
        let dup = stream
            .try_clone()
            .map_err(|e| Error::io("dup data socket", e))?;
        let abi = spec.abi();
        let (sock, part, dmabuf_id): (Box<dyn DevmemSocket>, _, _) = match spec {
            DevmemSpec::Kernel {
                abi,
                memory,
                dmabuf_id,
            } => (
                Box::new(KernelSocket::new(OwnedFd::from(dup), abi, Some(memory))),
                None,
                dmabuf_id,
            ),
            DevmemSpec::Emulated {
                abi,
                source,
                poison,
            } => {
                let (pool, part) = match source {
                    PoolSource::Local(bytes) => {
                        (RxPool::local(bytes).map_err(Error::devmem)?, None)
                    }
                    PoolSource::Shared(shared) => {
                        let (pool, part) = shared.take()?;
                        (pool, Some(part))
                    }
                };
                let mut cfg = EmuConfig::new(abi).with_seed(stream.as_raw_fd() as u64);
                cfg.ipv6 = stream.local_addr().is_ok_and(|a| a.is_ipv6());
                cfg.poison = poison.then_some(0xDB);
                let emu = EmuDevmemSocket::new(dup, pool, cfg).map_err(Error::devmem)?;
                let id = (abi == devmem::sockabi::KernelAbi::Upstream).then_some(cfg.dmabuf_id);
                (Box::new(emu), part, id)
            }
        };
        let gather = Box::new(PoolGather::new(pool_of(&*sock)?)?);
        Ok(DevmemRx {
            sock,
            _part: part,
            dmabuf_id,
            linear: vec![0; READ_MAX],
            // Sized for this ABI's cmsgs: a receive then never carries more
            // fragments than a GPU gather slot holds.
            control: vec![0; control_buffer_len_for(abi, MAX_FRAGS_PER_READ)],
            frags: Vec::new(),
            plan: GatherPlan::default(),
            gather,
            inflight: VecDeque::new(),
            open: Vec::new(),
            spare: Vec::new(),
            ledger: Ledger::default(),
            counters,
            deadline: GATHER_DEADLINE,
            hung: false,
        })
    }

    fn pool(&self) -> Result<&RxPool> {
        pool_of(&*self.sock)
    }

    /// The GPU of a GPU pool; `None` for host pools.
    pub fn gpu_ordinal(&self) -> Option<i32> {
        let pool = self.sock.rx_memory()?;
        pool.device().map(|m| m.context().ordinal())
    }

    /// One receive of at most `dst.len()` bytes into `dst`: parses the
    /// control bytes, starts the gather, and gives back the tokens of every
    /// gather that has finished. Accounting errors fail the socket (after
    /// the receive's tokens went back).
    pub fn recv(&mut self, dst: Dst<'_>) -> Result<Recv> {
        self.reap()?;
        if !self.open.is_empty() && self.pool()?.free_pages() == 0 {
            self.launch_open()?;
        }
        // A full pool (or every gather slot busy) frees up only as running
        // gathers finish: wait for the oldest rather than stall on the NIC.
        while !self.inflight.is_empty()
            && (self.pool()?.free_pages() == 0 || self.inflight.len() >= MAX_INFLIGHT)
        {
            self.wait_oldest()?;
        }
        let lim = dst.len().min(self.linear.len());
        let out = match self
            .sock
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
        let control = &self.control[..out.control_len];
        self.frags.clear();
        if let Err(e) = parse_rx_into(
            self.sock.abi(),
            control,
            out.bytes,
            out.msg_flags,
            &mut self.frags,
        ) {
            // The kernel lent these pages whatever went wrong: give them back.
            let mut lent = salvage_tokens(self.sock.abi(), control);
            self.lend(lent.iter().copied());
            let _ = self.release(&mut lent);
            return Err(Error::devmem(e));
        }
        let tokens = self.frags.iter().filter_map(Fragment::token);
        Counters::bump(
            &self.counters.devmem_tokens_received,
            self.ledger.lend(tokens),
        );
        if out.control_len == 0
            && out.bytes >= 4096
            && !ALL_LINEAR_LOGGED.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(bytes = out.bytes, "devmem receive: the kernel returned the payload as linear bytes (no devmem fragments): the flow is not steered to a devmem RX queue, or the NIC does not split headers; the transfer stays correct but pays a copy (logged once; see devmem_linear_bytes in Net::stats)");
        }
        self.plan.clear();
        let planned = self.check_dmabuf().and_then(|()| {
            unpack::plan(&self.frags, lim, 0, dst.len(), &mut self.plan).map_err(Error::devmem)
        });
        let fence = planned
            .and_then(|_| match self.gather.has_room(&self.plan) {
                true => Ok(()),
                false => self.launch_open(),
            })
            .and_then(|()| {
                let pool = pool_of(&*self.sock)?;
                self.gather
                    .gather(pool, &self.linear[..lim], &self.plan, dst)
            });
        let fence = match fence {
            Ok(f) => f,
            Err(e) => {
                // Nothing reads these pages now: they go back before the socket fails.
                let mut lent: Vec<u32> = self.frags.iter().filter_map(Fragment::token).collect();
                let _ = self.release(&mut lent);
                return Err(e);
            }
        };
        Counters::bump(&self.counters.devmem_frags, self.plan.pool.len() as u64);
        let linear: u64 = self.plan.linear.iter().map(|f| u64::from(f.len)).sum();
        Counters::bump(&self.counters.devmem_linear_bytes, linear);
        match fence {
            Fence::Done => {
                let mut tokens = std::mem::take(&mut self.plan.tokens);
                let r = self.release(&mut tokens);
                self.plan.tokens = tokens;
                r?;
            }
            Fence::Batched => self.open.extend_from_slice(&self.plan.tokens),
        }
        Ok(Recv::Bytes(out.bytes))
    }

    /// A gather runs in `slot`, reading the pages of `tokens`.
    fn run(&mut self, slot: usize, tokens: Vec<u32>) {
        Counters::bump(&self.counters.devmem_kernels, 1);
        self.inflight.push_back((slot, tokens));
    }

    fn take_open(&mut self) -> Vec<u32> {
        let mut spare = self.spare.pop().unwrap_or_default();
        spare.clear();
        std::mem::replace(&mut self.open, spare)
    }

    /// Launches the open batch, if any: the socket would block or waits, so
    /// nothing more joins it soon.
    pub fn launch_open(&mut self) -> Result<()> {
        let launched = self.gather.launch(pool_of(&*self.sock)?);
        let mut tokens = self.take_open();
        match launched {
            Ok(Some(slot)) => {
                self.run(slot, tokens);
                Ok(())
            }
            // Nothing staged (or nothing queued) reads these pages: they go
            // back, before the socket fails if the launch did.
            other => {
                let released = self.release(&mut tokens);
                self.spare.push(tokens);
                other.and(released)
            }
        }
    }

    /// Upstream fragments name their binding: one of another binding means
    /// the flow reached a queue this socket's pool is not bound to.
    fn check_dmabuf(&self) -> Result<()> {
        let Some(expected) = self.dmabuf_id else {
            return Ok(());
        };
        for f in &self.frags {
            if let Fragment::Pool {
                dmabuf_id: Some(found),
                ..
            } = *f
            {
                if found != expected {
                    return Err(Error::devmem(AbiError::ForeignDmabuf { expected, found }));
                }
            }
        }
        Ok(())
    }

    fn lend(&mut self, tokens: impl IntoIterator<Item = u32>) {
        Counters::bump(
            &self.counters.devmem_tokens_received,
            self.ledger.lend(tokens),
        );
    }

    /// Launches the open batch, waits for every running gather and gives
    /// its tokens back: afterwards every byte received so far is in its
    /// destination.
    pub fn settle(&mut self) -> Result<()> {
        // Those already running are waited for even if the launch failed.
        let launched = self.launch_open();
        while !self.inflight.is_empty() {
            self.wait_oldest()?;
        }
        launched
    }

    /// Settles before the pool and destinations go (drop).
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
        let Some((_, mut tokens)) = self.inflight.pop_front() else {
            return Ok(());
        };
        let r = self.release(&mut tokens);
        self.spare.push(tokens);
        r
    }

    /// Gives `tokens` back through the seam, each the ledger holds once.
    fn release(&mut self, tokens: &mut Vec<u32>) -> Result<()> {
        let unknown = self.ledger.give_back(tokens);
        Counters::bump(&self.counters.devmem_token_double_returns, unknown);
        let report = release_tokens(&mut *self.sock, tokens).map_err(Error::devmem)?;
        Counters::bump(&self.counters.devmem_tokens_returned, report.requested);
        Counters::bump(&self.counters.devmem_dontneed_calls, report.calls as u64);
        if let Some(freed) = report.freed {
            // Upstream counts what it freed: fewer means tokens it did not hold.
            Counters::bump(
                &self.counters.devmem_tokens_unfreed,
                report.requested.saturating_sub(freed),
            );
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn set_gather(&mut self, g: Box<dyn Gather>, deadline: Duration) {
        self.gather = g;
        self.deadline = deadline;
    }

    #[cfg(test)]
    pub(super) fn rx_pool(&self) -> &RxPool {
        self.sock.rx_memory().expect("a pool")
    }
}

/// The pool a devmem socket receives into.
fn pool_of(sock: &dyn DevmemSocket) -> Result<&RxPool> {
    sock.rx_memory()
        .ok_or_else(|| Error::InvalidArgument("a devmem receive without a pool".into()))
}

impl Drop for DevmemRx {
    fn drop(&mut self) {
        // The pool (and the destinations) must outlive every running gather.
        self.quiesce();
        if self.hung {
            // A stuck kernel may still read its pages: keep them from the
            // NIC; closing the socket frees them in the kernel.
            return;
        }
        // Close gives back whatever is still lent, once each.
        let mut left = self.ledger.take_all();
        if left.is_empty() {
            return;
        }
        match release_tokens(&mut *self.sock, &left) {
            Ok(r) => {
                Counters::bump(&self.counters.devmem_tokens_returned, r.requested);
                Counters::bump(&self.counters.devmem_dontneed_calls, r.calls as u64);
            }
            Err(e) => tracing::warn!(
                tokens = left.len(),
                "devmem tokens not returned on close ({e}); the kernel frees them with the socket"
            ),
        }
        left.clear();
    }
}

/// The backend the transport uses: CPU gathers for host pools, batched
/// copy-list kernels (and device-to-host copies) for GPU pools.
struct PoolGather {
    gpu: Option<GpuGather>,
}

impl PoolGather {
    fn new(pool: &RxPool) -> Result<Self> {
        let gpu = match pool.device() {
            Some(m) => Some(GpuGather::new(
                m.context(),
                batch_rows(pool.pages().pages()),
            )?),
            None => None,
        };
        Ok(PoolGather { gpu })
    }
}

/// Rows per GPU batch for a pool of `pages`: a quarter of the pool at most,
/// so that running batches leave pages to receive into.
fn batch_rows(pages: usize) -> usize {
    (pages / 4).clamp(MAX_FRAGS_PER_READ, BATCH_ROWS)
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
                    (None, Some(dev), Some(g)) => DeviceToHostUnpack {
                        ctx: g.ctx,
                        after: pool.rows_stream(&plan.pool).map_err(Error::devmem)?,
                    }
                    .unpack(dev, &mut *d, &plan.pool),
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
                g.stage(pool, dev, linear, plan, &span)
            }
            _ => Err(Error::Unsupported(
                "a host RX pool is not gathered into device memory directly; CUDA regions \
                 receive it through bounce staging"
                    .into(),
            )),
        }
    }

    fn has_room(&self, plan: &GatherPlan) -> bool {
        self.gpu.as_ref().is_none_or(|g| g.has_room(plan))
    }

    fn launch(&mut self, pool: &RxPool) -> Result<Option<usize>> {
        match self.gpu.as_mut() {
            Some(g) => g.launch(pool),
            None => Ok(None),
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
const ROWS_BYTES: usize = BATCH_ROWS * std::mem::size_of::<Frag>();
/// Bytes of a slot's pinned memory: rows, then linear bytes.
const SLOT_BYTES: usize = ROWS_BYTES + BATCH_LINEAR;
/// Every running gather plus the open batch.
const SLOTS: usize = MAX_INFLIGHT + 1;

/// The batch being filled: its slot, rows and linear bytes so far.
#[derive(Clone, Copy)]
struct Open {
    slot: usize,
    rows: usize,
    linear: usize,
}

/// The CUDA side of a GPU pool's socket: the context's kernel, compiled
/// once per process, a stream of the socket's own, and its batch slots,
/// made up front (pinned allocations take milliseconds): each a part of
/// `pinned` (rows with absolute addresses, then the linear bytes they copy,
/// both read by the kernel through unified addressing) and an event
/// marking its end.
struct GpuGather {
    ctx: &'static Context,
    kernel: &'static Kernel,
    stream: Stream,
    pinned: PinnedBuffer,
    events: Vec<Event>,
    free: Vec<usize>,
    open: Option<Open>,
    /// Rows a batch takes before it is launched.
    max_rows: usize,
}

impl GpuGather {
    fn new(ctx: &'static Context, max_rows: usize) -> Result<Self> {
        let c = |e| cuda_error(e);
        Ok(GpuGather {
            ctx,
            kernel: Kernel::shared(ctx).map_err(c)?,
            stream: Stream::new(ctx).map_err(c)?,
            pinned: PinnedBuffer::alloc(ctx, SLOTS * SLOT_BYTES).map_err(c)?,
            events: (0..SLOTS)
                .map(|_| Event::new(ctx))
                .collect::<std::result::Result<_, _>>()
                .map_err(c)?,
            free: (0..SLOTS).rev().collect(),
            open: None,
            max_rows: max_rows.min(BATCH_ROWS),
        })
    }

    fn take_slot(&mut self) -> Result<usize> {
        self.free.pop().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "more than {MAX_INFLIGHT} devmem unpacks in flight on one socket"
            ))
        })
    }

    /// The first byte of `slot`'s pinned memory.
    fn slot_mem(&self, slot: usize) -> *mut u8 {
        debug_assert!(slot < SLOTS);
        // SAFETY: slot < SLOTS, so the offset lies inside `pinned`.
        unsafe { self.pinned.as_ptr().add(slot * SLOT_BYTES) }
    }

    /// What `plan` takes of a batch: rows, pinned linear bytes, and whether
    /// its linear bytes fit the pinned memory (else they are copied from
    /// the linear buffer). Header-split misses travel in the batch; a flow
    /// the kernel copies whole (not steered to a devmem queue) does not.
    fn needs(plan: &GatherPlan) -> (usize, usize, bool) {
        let lin_end = plan
            .linear
            .iter()
            .map(|r| (r.src + u64::from(r.len)) as usize)
            .max()
            .unwrap_or(0);
        match lin_end <= LINEAR_MAX {
            true => (plan.pool.len() + plan.linear.len(), lin_end, true),
            false => (plan.pool.len(), 0, false),
        }
    }

    fn has_room(&self, plan: &GatherPlan) -> bool {
        let (rows, lin, _) = Self::needs(plan);
        self.open
            .is_none_or(|o| o.rows + rows <= self.max_rows && o.linear + lin <= BATCH_LINEAR)
    }

    /// Adds a receive's rows to the open batch, which must have room for
    /// them ([`GpuGather::has_room`]); linear bytes too many for the
    /// batch's pinned memory are copied from `linear` on the batch's
    /// stream right away.
    fn stage(
        &mut self,
        pool: &RxPool,
        dev: &(impl DeviceMem + ?Sized),
        linear: &[u8],
        plan: &GatherPlan,
        dst: &DeviceSpan,
    ) -> Result<Fence> {
        unpack::check(&plan.pool, dev.device_len(), dst.device_len()).map_err(Error::devmem)?;
        unpack::check(&plan.linear, linear.len(), dst.device_len()).map_err(Error::devmem)?;
        if plan.pool.len() > MAX_FRAGS_PER_READ {
            return Err(Error::Protocol(format!(
                "devmem unpack: {} pool fragments in one receive, at most {MAX_FRAGS_PER_READ}",
                plan.pool.len()
            )));
        }
        let (rows, lin, pinned) = Self::needs(plan);
        if rows == 0 && plan.linear.is_empty() {
            return Ok(Fence::Done);
        }
        if !self.has_room(plan) || rows > BATCH_ROWS {
            return Err(Error::InvalidArgument(format!(
                "devmem unpack: {rows} rows staged into a batch without room for them"
            )));
        }
        let mut o = match self.open {
            Some(o) => o,
            None => Open {
                slot: self.take_slot()?,
                rows: 0,
                linear: 0,
            },
        };
        let host = self.slot_mem(o.slot);
        let (src_base, dst_base) = (dev.device_ptr(), dst.device_ptr());
        // SAFETY: the open slot is not launched, so nothing reads its pinned
        // memory; rows (o.rows + rows <= max_rows <= BATCH_ROWS, or an empty
        // batch's rows <= BATCH_ROWS) and linear bytes (o.linear + lin <=
        // BATCH_LINEAR) fit it, and the buffer is page-aligned and
        // SLOT_BYTES a multiple of 8, so every Frag is aligned.
        unsafe {
            let at = host.cast::<Frag>().add(o.rows);
            let lin_at = host.add(ROWS_BYTES + o.linear);
            for (i, r) in plan.pool.iter().enumerate() {
                at.add(i)
                    .write(Frag::new(src_base + r.src, dst_base + r.dst, r.len));
            }
            if pinned {
                std::ptr::copy_nonoverlapping(linear.as_ptr(), lin_at, lin);
                for (i, r) in plan.linear.iter().enumerate() {
                    let src = lin_at as u64 + r.src;
                    at.add(plan.pool.len() + i)
                        .write(Frag::new(src, dst_base + r.dst, r.len));
                }
            }
        }
        o.rows += rows;
        o.linear += lin;
        self.open = Some(o);
        if !pinned {
            self.ctx.make_current().map_err(cuda_error)?;
            let stream = self.stream_for(pool)?;
            for r in &plan.linear {
                // SAFETY: the row lies inside `linear` and the destination
                // (checked above); from pageable memory the copy is staged
                // before the call returns, so `linear` may be reused, and
                // the batch's event, recorded later on this stream, marks
                // its end.
                unsafe {
                    stream
                        .htod(
                            dst_base + r.dst,
                            linear.as_ptr().add(r.src as usize),
                            r.len as usize,
                        )
                        .map_err(cuda_error)?
                };
            }
        }
        Ok(Fence::Batched)
    }

    /// The stream a batch's work goes on: an emulated GPU pool's landed
    /// bytes reach it on the pool's readers' stream, else the socket's own.
    fn stream_for<'a>(&'a self, pool: &'a RxPool) -> Result<&'a Stream> {
        Ok(pool
            .readers_stream()
            .map_err(Error::devmem)?
            .unwrap_or(&self.stream))
    }

    /// Queues the open batch's kernel after the pool's landing; returns the
    /// slot whose event marks its end.
    fn launch(&mut self, pool: &RxPool) -> Result<Option<usize>> {
        let Some(o) = self.open.take() else {
            return Ok(None);
        };
        let rows = self.slot_mem(o.slot) as u64;
        let stream = match self.stream_for(pool) {
            Ok(s) => s,
            Err(e) => {
                self.free.push(o.slot);
                return Err(e);
            }
        };
        let queued = (|| {
            self.ctx.make_current().map_err(cuda_error)?;
            // SAFETY: every row was checked against the pool and its
            // destination when staged; the pool outlives the socket's
            // gathers (DevmemRx settles before it drops), each destination's
            // request holds its region until settled, and the rows stay
            // untouched until the slot's event fired.
            unsafe {
                self.kernel
                    .launch_list(stream, rows, o.rows as u32)
                    .map_err(cuda_error)?
            };
            self.events[o.slot].record(stream).map_err(cuda_error)
        })();
        match queued {
            Ok(()) => Ok(Some(o.slot)),
            Err(e) => {
                // Nothing queued may outlive the slot's reuse.
                let _ = stream.sync();
                self.free.push(o.slot);
                Err(e)
            }
        }
    }

    fn event(&self, slot: usize) -> Result<&Event> {
        self.events
            .get(slot)
            .ok_or_else(|| Error::InvalidArgument(format!("no devmem unpack slot {slot}")))
    }

    fn done(&mut self, slot: usize) -> Result<bool> {
        let done = self.event(slot)?.done().map_err(cuda_error)?;
        if done {
            self.free.push(slot);
        }
        Ok(done)
    }

    fn wait(&mut self, slot: usize, limit: Duration) -> Result<()> {
        self.ctx.make_current().map_err(cuda_error)?;
        self.event(slot)?
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

    /// A gather that copies on the CPU at once but reports its batches done
    /// only once the test allows: a kernel still running, under the test's
    /// control. Each receive is a batch of its own, launched by the next
    /// receive (or a launch); with `one_batch`, every receive joins the open
    /// batch until a launch.
    #[derive(Clone, Default)]
    pub(in crate::engine) struct Manual {
        /// Batches `0..finished` have finished.
        pub finished: Arc<AtomicUsize>,
        /// Batches launched so far.
        pub launched: Arc<AtomicUsize>,
        one_batch: bool,
        staged: bool,
    }

    impl Manual {
        pub fn one_batch() -> Manual {
            Manual {
                one_batch: true,
                ..Manual::default()
            }
        }

        pub fn finish_all(&self) {
            self.finished.store(usize::MAX, Ordering::SeqCst);
        }

        fn launch_staged(&mut self) -> Option<usize> {
            if !std::mem::take(&mut self.staged) {
                return None;
            }
            Some(self.launched.fetch_add(1, Ordering::SeqCst))
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
            self.staged = true;
            Ok(Fence::Batched)
        }

        fn has_room(&self, _: &GatherPlan) -> bool {
            self.one_batch || !self.staged
        }

        fn launch(&mut self, _: &RxPool) -> Result<Option<usize>> {
            Ok(self.launch_staged())
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
        let spec = DevmemSpec::Emulated {
            abi: devmem::sockabi::KernelAbi::Upstream,
            source: PoolSource::Local(pages * PAGE_SIZE),
            poison: true,
        };
        let mut d = DevmemRx::new(stream, spec, counters).unwrap();
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

    /// Receives until the pool is full; returns the bytes received.
    fn fill_pool(d: &mut DevmemRx, got: &mut [u8]) -> usize {
        let mut at = 0;
        while d.rx_pool().free_pages() > 0 {
            at += recv_into(d, &mut got[at..]).unwrap();
        }
        at
    }

    #[test]
    fn tokens_go_back_only_after_the_gather_reading_their_pages_finished() {
        let data = pattern(40 << 10);
        let (stream, _peer) = loaded(&data);
        let m = Manual::default();
        let mut d = rx(&stream, 64, &m, Duration::from_secs(5));
        let mut got = vec![0u8; data.len()];
        let n1 = recv_into(&mut d, &mut got).unwrap();
        let first = d.rx_pool().outstanding();
        assert!(!first.is_empty(), "a receive lent pool pages");
        assert_eq!(d.counters.devmem_tokens_returned.load(Ordering::SeqCst), 0);
        // The first gather still runs: a second receive keeps its tokens out.
        let n2 = recv_into(&mut d, &mut got[n1..]).unwrap();
        let both = d.rx_pool().outstanding();
        assert!(first.iter().all(|t| both.contains(t)), "held while running");
        assert!(both.len() > first.len());
        // Once it finished, the next receive gives back exactly its tokens.
        m.finished.store(1, Ordering::SeqCst);
        let mut at = n1 + n2;
        at += recv_into(&mut d, &mut got[at..]).unwrap();
        let now = d.rx_pool().outstanding();
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
        assert!(d.rx_pool().outstanding().is_empty());
        let c = &d.counters;
        assert_eq!(
            c.devmem_tokens_returned.load(Ordering::SeqCst),
            c.devmem_frags.load(Ordering::SeqCst)
        );
        assert!(got == data, "bytes differ");
    }

    /// A gather that fails at once, as a CUDA launch can.
    struct Failing;

    impl Gather for Failing {
        fn gather(&mut self, _: &RxPool, _: &[u8], _: &GatherPlan, _: Dst<'_>) -> Result<Fence> {
            Err(Error::Unsupported("test gather fails".into()))
        }
        fn has_room(&self, _: &GatherPlan) -> bool {
            true
        }
        fn launch(&mut self, _: &RxPool) -> Result<Option<usize>> {
            Ok(None)
        }
        fn done(&mut self, _: usize) -> Result<bool> {
            Ok(true)
        }
        fn wait(&mut self, _: usize, _: Duration) -> Result<()> {
            Ok(())
        }
    }

    fn balanced(c: &Counters) -> (u64, u64) {
        (
            c.devmem_tokens_received.load(Ordering::SeqCst),
            c.devmem_tokens_returned.load(Ordering::SeqCst),
        )
    }

    #[test]
    fn a_failed_gather_gives_its_tokens_back_before_the_socket_fails() {
        let data = pattern(20 << 10);
        let (stream, _peer) = loaded(&data);
        let mut d = rx(&stream, 16, &Manual::default(), Duration::from_secs(5));
        d.set_gather(Box::new(Failing), Duration::from_secs(5));
        let mut got = vec![0u8; data.len()];
        assert!(recv_into(&mut d, &mut got).is_err());
        let (lent, back) = balanced(&d.counters);
        assert!(lent > 0);
        assert_eq!(lent, back, "every token of the failed receive went back");
        assert!(d.rx_pool().outstanding().is_empty());
    }

    #[test]
    fn close_waits_for_running_gathers_and_returns_every_token_once() {
        let data = pattern(40 << 10);
        let (stream, _peer) = loaded(&data);
        let m = Manual::default();
        let mut d = rx(&stream, 64, &m, Duration::from_secs(5));
        let counters = d.counters.clone();
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while at < data.len() {
            at += recv_into(&mut d, &mut got[at..]).unwrap();
        }
        let (lent, back) = balanced(&counters);
        assert!(lent > 0 && back == 0, "all still held by running gathers");
        let m2 = m.clone();
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            m2.finish_all();
        });
        drop(d);
        finisher.join().unwrap();
        assert_eq!(balanced(&counters), (lent, lent));
        assert_eq!(
            counters.devmem_token_double_returns.load(Ordering::SeqCst),
            0
        );
        assert!(got == data);
    }

    #[test]
    fn the_ledger_returns_each_token_once() {
        let mut l = Ledger::default();
        assert_eq!(l.lend([1, 2, 2, 3]), 4);
        let mut back = vec![2, 2, 2, 9];
        assert_eq!(
            l.give_back(&mut back),
            2,
            "one 2 too many and a 9 never lent"
        );
        assert_eq!(back, vec![2, 2]);
        let mut left = l.take_all();
        left.sort_unstable();
        assert_eq!(left, vec![1, 3]);
        assert!(l.take_all().is_empty());
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
        let at = fill_pool(&mut d, &mut got);
        let held = d.rx_pool().outstanding();
        let e = recv_into(&mut d, &mut got[at..]).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert_eq!(d.rx_pool().outstanding(), held, "no token went back early");
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
            let full = d.rx_pool().free_pages() == 0;
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

    #[test]
    fn a_pool_filled_by_the_open_batch_launches_it_and_waits_instead_of_stalling() {
        let data = pattern(64 << 10);
        let (stream, _peer) = loaded(&data);
        let m = Manual::one_batch();
        let mut d = rx(&stream, 4, &m, Duration::from_secs(5));
        let mut got = vec![0u8; data.len()];
        let mut at = fill_pool(&mut d, &mut got);
        assert_eq!(
            m.launched.load(Ordering::SeqCst),
            0,
            "all in the open batch"
        );
        let held = d.rx_pool().outstanding();
        let (m2, launched) = (m.clone(), m.launched.clone());
        let finisher = std::thread::spawn(move || {
            // The receive below must have launched the batch to wait on it.
            while launched.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            m2.finish_all();
        });
        assert_eq!(balanced(&d.counters).1, 0);
        at += recv_into(&mut d, &mut got[at..]).unwrap();
        finisher.join().unwrap();
        assert_eq!(
            balanced(&d.counters).1,
            held.len() as u64,
            "the batch's pages came back, and it received into them"
        );
        while at < data.len() {
            at += recv_into(&mut d, &mut got[at..]).unwrap();
        }
        d.settle().unwrap();
        assert!(d.rx_pool().outstanding().is_empty());
        assert!(got == data, "bytes differ");
    }

    #[test]
    fn settle_launches_the_open_batch_and_returns_its_tokens_only_once_it_finished() {
        let data = pattern(24 << 10);
        let (stream, _peer) = loaded(&data);
        let m = Manual::one_batch();
        let mut d = rx(&stream, 64, &m, Duration::from_millis(50));
        let mut got = vec![0u8; data.len()];
        let mut at = 0;
        while at < data.len() {
            at += recv_into(&mut d, &mut got[at..]).unwrap();
        }
        let held = d.rx_pool().outstanding();
        assert!(!held.is_empty());
        // Launched but never finished: settling fails and keeps the pages.
        assert!(matches!(d.settle(), Err(Error::Timeout { .. })));
        assert_eq!(
            m.launched.load(Ordering::SeqCst),
            1,
            "one batch for every receive"
        );
        assert_eq!(d.rx_pool().outstanding(), held);
        std::mem::forget(d); // its gather never ends: dropping would wait again

        let (stream, _peer) = loaded(&data);
        let m = Manual::one_batch();
        let mut d = rx(&stream, 64, &m, Duration::from_secs(5));
        let mut at = 0;
        while at < data.len() {
            at += recv_into(&mut d, &mut got[at..]).unwrap();
        }
        m.finish_all();
        d.settle().unwrap();
        assert!(d.rx_pool().outstanding().is_empty());
        let (lent, back) = balanced(&d.counters);
        assert_eq!(lent, back);
        assert!(got == data);
    }
}
