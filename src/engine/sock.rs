//! One data socket's send and receive state, independent of how the syscalls
//! are issued: an engine asks for the next I/O (`tx_plan` / `rx_plan`), does
//! it (a syscall, or an io_uring submission) and reports the result
//! (`tx_done` / `rx_done`).

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

use devmem::emu::{EmuConfig, EmuDevmemSocket};
use devmem::pool::RxPool;
use devmem::sockabi::{control_buffer_len, parse_rx_into, Fragment, KernelAbi, RecvOutcome};
use devmem::unpack::{self, CpuUnpack, GatherPlan, Unpack};

use super::{Job, TxMode};
use crate::config::ZeroCopy;
use crate::error::Error;
use crate::gpumemd::{PoolPart, PoolSource};
use crate::memory::{RxPath, TxPath};
use crate::stats::Counters;
use crate::wire::{Chunk, CHUNK_LEN};
use crate::zerocopy::{self, Tracker};

/// Largest piece of a discarded chunk read at once.
const SCRATCH_LEN: usize = 1 << 20;

/// Progress of the chunk in flight in one direction of a socket.
#[derive(Default)]
struct Cursor {
    active: bool,
    hdr: [u8; CHUNK_LEN],
    hdr_done: usize,
    body_done: usize,
}

/// Zero-copy state of a data socket.
pub(super) struct Zc {
    /// False once the kernel reported copying in `auto` mode (or SO_ZEROCOPY failed).
    pub enabled: bool,
    pub mode: ZeroCopy,
    pub min: usize,
    pub tracker: Tracker,
    /// Jobs fully sent whose last zero-copy send is not yet acknowledged.
    awaiting: VecDeque<Job>,
}

/// The next send: up to two pieces (header rest, body rest).
pub(super) struct TxPlan {
    pub parts: [(*const u8, usize); 2],
    pub n: usize,
    pub zerocopy: bool,
}

/// The next receive: header rest and body rest.
pub(super) struct RxPlan {
    pub parts: [(*mut u8, usize); 2],
}

/// The receive side of an emulated devmem NIC on this socket.
pub(super) struct DevmemRx {
    emu: EmuDevmemSocket<TcpStream>,
    /// The part of gpumemd's pool this socket receives into, if shared.
    _part: Option<PoolPart>,
    linear: Vec<u8>,
    control: Vec<u8>,
    frags: Vec<Fragment>,
    plan: GatherPlan,
}

/// What one devmem receive step did.
pub(super) enum Step {
    Moved,
    WouldBlock,
    Idle,
}

/// Linear (header-split miss) bytes one receive may carry.
const LINEAR_MAX: usize = 256;
/// Control buffer for one receive: a page-sized read never needs more fragments.
const MAX_FRAGS_PER_READ: usize = 64;

pub(super) struct Sock {
    pub stream: TcpStream,
    devmem: Option<Box<DevmemRx>>,
    sends: VecDeque<Job>,
    recvs: VecDeque<Job>,
    tx: Cursor,
    rx: Cursor,
    pub readable: bool,
    pub writable: bool,
    pub dead: Option<Error>,
    pub zc: Zc,
}

/// The process logs the kernel's copying of zero-copy sends once.
static COPY_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Sock {
    pub fn new(stream: TcpStream, mode: TxMode, mut dead: Option<Error>) -> Self {
        let enabled = mode.zerocopy != ZeroCopy::Off && enable_zerocopy(&stream);
        let devmem = match mode
            .devmem_emulated
            .map(|(abi, source)| DevmemRx::new(&stream, abi, source))
        {
            Some(Ok(d)) => Some(Box::new(d)),
            Some(Err(e)) => {
                dead.get_or_insert(e);
                None
            }
            None => None,
        };
        let (zerocopy, min_zcopy) = (mode.zerocopy, mode.min_zcopy);
        Sock {
            stream,
            devmem,
            sends: VecDeque::new(),
            recvs: VecDeque::new(),
            tx: Cursor::default(),
            rx: Cursor::default(),
            readable: true,
            writable: true,
            dead,
            zc: Zc {
                enabled,
                mode: zerocopy,
                min: min_zcopy,
                tracker: Tracker::default(),
                awaiting: VecDeque::new(),
            },
        }
    }

    pub fn enqueue(&mut self, job: Job, send: bool) {
        if let Some(e) = &self.dead {
            job.finish(Some(e.clone()));
        } else if send {
            self.sends.push_back(job);
        } else {
            self.recvs.push_back(job);
        }
    }

    pub fn fail(&mut self, e: Error) {
        let awaiting: Vec<Job> = self.zc.awaiting.drain(..).collect();
        for job in self
            .sends
            .drain(..)
            .chain(self.recvs.drain(..))
            .chain(awaiting)
        {
            job.finish(Some(e.clone()));
        }
        self.tx.active = false;
        self.rx.active = false;
        if self.dead.is_none() {
            self.dead = Some(e);
        }
    }

    pub fn wants_tx(&self) -> bool {
        self.dead.is_none() && !self.sends.is_empty()
    }

    pub fn wants_rx(&self) -> bool {
        self.dead.is_none() && !self.recvs.is_empty()
    }

    /// What to send next; `None` when there is nothing (or the socket failed).
    pub fn tx_plan(&mut self) -> Option<TxPlan> {
        if self.dead.is_some() {
            return None;
        }
        let job = self.sends.front()?;
        let (off, len) = job.chunk();
        let starting = !self.tx.active;
        if starting {
            self.tx = Cursor {
                active: true,
                hdr: Chunk {
                    seq: job.seq,
                    offset: off,
                    len: len as u32,
                }
                .encode(),
                ..Cursor::default()
            };
        }
        let src = match job.region.as_ref().map(|r| r.source(job.base + off, len)) {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                self.fail(e);
                return None;
            }
            None => {
                self.fail(Error::InvalidArgument("send job without memory".into()));
                return None;
            }
        };
        if starting {
            self.prefetch_next();
        }
        let hdr_left = CHUNK_LEN - self.tx.hdr_done;
        let body = (src.wrapping_add(self.tx.body_done), len - self.tx.body_done);
        let hdr = (self.tx.hdr[self.tx.hdr_done..].as_ptr(), hdr_left);
        let zc_chunk = self.zc.enabled
            && len >= self.zc.min
            && job.region.as_ref().is_some_and(|r| r.zerocopy_ok());
        Some(if hdr_left == 0 {
            TxPlan {
                parts: [body, (std::ptr::null(), 0)],
                n: 1,
                zerocopy: zc_chunk,
            }
        } else if zc_chunk {
            // With zero-copy the kernel reads the iovecs after the call returns, so the
            // header (which the next chunk overwrites) goes first in a copying send.
            TxPlan {
                parts: [hdr, (std::ptr::null(), 0)],
                n: 1,
                zerocopy: false,
            }
        } else {
            TxPlan {
                parts: [hdr, body],
                n: 2,
                zerocopy: false,
            }
        })
    }

    /// Lets the region of the chunk after the current one start staging it.
    fn prefetch_next(&self) {
        let next = self
            .sends
            .front()
            .and_then(|j| j.following_chunk().map(|c| (j, c)))
            .or_else(|| self.sends.get(1).map(|j| (j, j.chunk())));
        if let Some((job, (off, len))) = next {
            if let Some(r) = job.region.as_ref() {
                r.prefetch(job.base + off, len);
            }
        }
    }

    /// `n` bytes of the last plan went out; `zc_id` is the zero-copy id of that send.
    pub fn tx_done(&mut self, n: usize, zc_id: Option<u32>) {
        let Some(job) = self.sends.front_mut() else {
            return;
        };
        let (_, len) = job.chunk();
        if zc_id.is_some() {
            job.zc_last = zc_id;
        }
        let h = n.min(CHUNK_LEN - self.tx.hdr_done);
        self.tx.hdr_done += h;
        self.tx.body_done += n - h;
        if self.tx.hdr_done == CHUNK_LEN && self.tx.body_done == len {
            self.tx.active = false;
            if let Some(r) = job.region.as_ref() {
                r.sent(job.base + job.chunk().0, len);
            }
            if job.advance() {
                if let Some(done) = self.sends.pop_front() {
                    match done.zc_last {
                        Some(id) if !self.zc.tracker.done_through(id) => {
                            self.zc.awaiting.push_back(done)
                        }
                        _ => done.finish(None),
                    }
                }
            }
        }
    }

    /// Where to receive next; `None` when no receive is posted (or the socket failed).
    pub fn rx_plan(&mut self, scratch: &mut Vec<u8>) -> Option<RxPlan> {
        if self.dead.is_some() {
            return None;
        }
        let job = self.recvs.front()?;
        let (off, len) = job.chunk();
        if !self.rx.active {
            self.rx = Cursor {
                active: true,
                ..Cursor::default()
            };
        }
        let want = len - self.rx.body_done;
        let body = match job.region.as_ref() {
            Some(r) => match r.sink(job.base + off + self.rx.body_done as u64, want) {
                Ok(p) => (p, want),
                Err(e) => {
                    self.fail(e);
                    return None;
                }
            },
            None => {
                if scratch.is_empty() {
                    scratch.resize(SCRATCH_LEN, 0);
                }
                (scratch.as_mut_ptr(), want.min(scratch.len()))
            }
        };
        let hdr_done = self.rx.hdr_done;
        Some(RxPlan {
            parts: [
                (self.rx.hdr[hdr_done..].as_mut_ptr(), CHUNK_LEN - hdr_done),
                body,
            ],
        })
    }

    /// `n` bytes arrived for the last plan (0 = the peer closed).
    pub fn rx_done(&mut self, n: usize) {
        if n == 0 {
            self.fail(Error::ConnectionLost("peer closed a data socket".into()));
            return;
        }
        let Some(job) = self.recvs.front_mut() else {
            return;
        };
        let (off, len) = job.chunk();
        let hdr_done = self.rx.hdr_done;
        let h = n.min(CHUNK_LEN - hdr_done);
        self.rx.hdr_done += h;
        self.rx.body_done += n - h;
        if hdr_done < CHUNK_LEN && self.rx.hdr_done == CHUNK_LEN {
            let expected = Chunk {
                seq: job.seq,
                offset: off,
                len: len as u32,
            };
            match Chunk::decode(&self.rx.hdr) {
                Ok(c) if c == expected => {}
                Ok(c) => {
                    return self.fail(Error::Protocol(format!(
                        "got chunk {c:?}, expected {expected:?}"
                    )))
                }
                Err(e) => return self.fail(e),
            }
        }
        if self.rx.hdr_done == CHUNK_LEN && self.rx.body_done == len {
            self.rx.active = false;
            if let Some(r) = job.region.as_ref() {
                if let Err(e) = r.landed(job.base + off, len) {
                    return self.fail(e);
                }
            }
            if job.advance() {
                let settled = job.region.as_ref().map_or(Ok(()), |r| r.settle());
                if let Err(e) = settled {
                    return self.fail(e);
                }
                if let Some(done) = self.recvs.pop_front() {
                    done.finish(None);
                }
            }
        }
    }

    /// Applies a zero-copy completion; in `auto` mode a copying kernel turns zero-copy off.
    pub fn zc_completed(&mut self, c: zerocopy::Completion, counters: &Counters) {
        self.zc.tracker.complete(c);
        let n = c.hi.wrapping_sub(c.lo).wrapping_add(1) as u64;
        Counters::bump(
            if c.copied {
                &counters.zc_copied
            } else {
                &counters.zc_acked
            },
            n,
        );
        if c.copied && self.zc.mode == ZeroCopy::Auto && self.zc.enabled {
            // As msg_zerocopy.rst advises: the kernel copies anyway (loopback, or a NIC
            // without scatter-gather/checksum offload), so stop paying for notifications.
            self.zc.enabled = false;
            Counters::bump(&counters.zc_switched_off, 1);
            let peer = self
                .stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if !COPY_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(%peer, "the kernel copies MSG_ZEROCOPY sends on this path; these sockets use plain sends (logged once)");
            } else {
                tracing::debug!(%peer, "zero-copy sends copied; plain sends from now on");
            }
        }
    }

    /// Finishes jobs whose zero-copy sends are all acknowledged. True if any finished.
    pub fn release_zc(&mut self) -> bool {
        let mut moved = false;
        while let Some(job) = self.zc.awaiting.front() {
            if !job
                .zc_last
                .is_some_and(|id| self.zc.tracker.done_through(id))
            {
                break;
            }
            if let Some(job) = self.zc.awaiting.pop_front() {
                job.finish(None);
                moved = true;
            }
        }
        moved
    }

    pub fn is_devmem(&self) -> bool {
        self.devmem.is_some()
    }

    /// One receive through the emulated devmem NIC: payload lands in its RX
    /// pool, the fragments are unpacked into the chunk being received and
    /// their tokens go straight back. Header and body are read separately
    /// (each read asks for at most what its part still needs).
    pub fn rx_devmem(&mut self, scratch: &mut Vec<u8>, counters: &Counters) -> Step {
        let Some(plan) = self.rx_plan(scratch) else {
            return Step::Idle;
        };
        let [(hp, hl), (bp, bl)] = plan.parts;
        let (dst_ptr, dst_len) = if hl > 0 { (hp, hl) } else { (bp, bl) };
        let Some(d) = self.devmem.as_mut() else {
            return Step::Idle;
        };
        let abi = d.emu.config().abi;
        let out = match d
            .emu
            .recv_devmem_up_to(&mut d.linear, &mut d.control, dst_len)
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::WouldBlock,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Step::Moved,
            Err(e) => {
                self.fail(Error::io("devmem recv", e));
                return Step::Idle;
            }
        };
        if out.bytes == 0 {
            self.rx_done(0);
            return Step::Moved;
        }
        // SAFETY: the plan's part is valid for writes while its job holds the region.
        let dst = unsafe { super::bytes_mut(dst_ptr, dst_len) };
        if let Err(e) = d.gather(abi, out, dst, counters) {
            self.fail(e);
            return Step::Idle;
        }
        self.rx_done(out.bytes);
        Step::Moved
    }

    pub fn tx_failed(&mut self, e: Errno) {
        self.fail(Error::io("send", e.into()));
    }

    pub fn rx_failed(&mut self, e: Errno) {
        self.fail(Error::io("recv", e.into()));
    }
}

impl DevmemRx {
    fn new(stream: &TcpStream, abi: KernelAbi, source: PoolSource) -> Result<Self, Error> {
        let dup = stream
            .try_clone()
            .map_err(|e| Error::io("dup data socket", e))?;
        let (pool, part) = match source {
            PoolSource::Local(bytes) => (
                RxPool::local(bytes)
                    .map_err(|e| Error::Config(format!("emulated devmem RX pool: {e}")))?,
                None,
            ),
            PoolSource::Shared(shared) => {
                let (pool, part) = shared.take()?;
                (pool, Some(part))
            }
        };
        let seed = stream.as_raw_fd() as u64;
        let emu = EmuDevmemSocket::new(dup, pool, EmuConfig::new(abi).with_seed(seed))
            .map_err(|e| Error::Config(format!("emulated devmem NIC: {e}")))?;
        Ok(DevmemRx {
            emu,
            _part: part,
            linear: vec![0; LINEAR_MAX],
            control: vec![0; control_buffer_len(MAX_FRAGS_PER_READ)],
            frags: Vec::new(),
            plan: GatherPlan::default(),
        })
    }

    /// Parses the control bytes, unpacks pool and linear fragments into
    /// `dst`, and returns every token. Accounting errors fail the socket.
    fn gather(
        &mut self,
        abi: KernelAbi,
        out: RecvOutcome,
        dst: &mut [u8],
        counters: &Counters,
    ) -> Result<(), Error> {
        let proto = |e: &dyn std::fmt::Display| Error::Protocol(format!("devmem receive: {e}"));
        self.frags.clear();
        parse_rx_into(
            abi,
            &self.control[..out.control_len],
            out.bytes,
            out.msg_flags,
            &mut self.frags,
        )
        .map_err(|e| proto(&e))?;
        self.plan.clear();
        unpack::plan(&self.frags, self.linear.len(), 0, dst.len(), &mut self.plan)
            .map_err(|e| proto(&e))?;
        let mut cpu = CpuUnpack;
        // The transport builds host pools only (SharedPool maps a memfd).
        let pool = self.emu.pool().host().ok_or_else(|| {
            Error::Unsupported("emulated devmem: the transport unpacks host RX pools only".into())
        })?;
        cpu.unpack(pool, dst, &self.plan.pool)
            .map_err(|e| proto(&e))?;
        cpu.unpack(&self.linear[..], dst, &self.plan.linear)
            .map_err(|e| proto(&e))?;
        let report = self
            .emu
            .release_tokens(&self.plan.tokens)
            .map_err(|e| proto(&e))?;
        Counters::bump(&counters.devmem_frags, self.plan.pool.len() as u64);
        Counters::bump(&counters.devmem_tokens_returned, report.requested);
        Counters::bump(&counters.devmem_dontneed_calls, report.calls as u64);
        let linear: u64 = self.plan.linear.iter().map(|f| u64::from(f.len)).sum();
        Counters::bump(&counters.devmem_linear_bytes, linear);
        Ok(())
    }
}

/// Sets SO_ZEROCOPY; false (with a log line) where the kernel refuses it.
fn enable_zerocopy(s: &TcpStream) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            zerocopy::SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::warn!(
            "SO_ZEROCOPY refused ({}); plain sends",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}
