//! One data socket's send and receive state, independent of how the syscalls
//! are issued: an engine asks for the next I/O (`tx_plan` / `rx_plan`), does
//! it (a syscall, or an io_uring submission) and reports the result
//! (`tx_done` / `rx_done`).
//!
//! A sending socket works through its jobs' chunks in order. A receiving
//! socket reads a chunk header, asks its comm where that chunk goes
//! ([`CommLink::lookup`]) and lands the body there: chunks are placed by
//! `(seq, offset)`, whatever socket carries them. A chunk counts as in place
//! once its bytes settled (staging copies and unpack kernels finished).

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::errno::Errno;
use socket2::SockRef;

use super::devmem_rx::{DevmemRx, Dst, Recv};
use super::devmem_tx::{DevmemBody, DevmemTx};
use super::placement::{CommLink, Lookup, Placement};
use super::{Job, TxMode};
use crate::config::ZeroCopy;
use crate::error::Error;
use crate::memory::{RxPath, TxPath};
use crate::path::{rx_route, RxRoute};
use crate::stats::Counters;
use crate::wire::{Chunk, CHUNK_LEN};
use crate::zerocopy::{self, Tracker};

/// Largest piece of a discarded chunk read at once.
const SCRATCH_LEN: usize = 1 << 20;
/// Chunks landed before a socket waits for their copies to finish.
const MAX_UNSETTLED: usize = 8;

/// Progress of the chunk being sent.
#[derive(Default)]
struct Cursor {
    active: bool,
    hdr: [u8; CHUNK_LEN],
    hdr_done: usize,
    body_done: usize,
}

/// The body of the chunk being received.
struct Body {
    /// `None`: read and drop (a duplicate, or a message that needs no bytes).
    dst: Option<Arc<Placement>>,
    /// Offset of the chunk in its message.
    off: u64,
    len: usize,
    done: usize,
    /// The body goes straight to device memory (GPU pool, CUDA region):
    /// no staging to land.
    direct: bool,
}

/// Progress of the chunk being received: its header, then its body.
struct RxCursor {
    hdr: [u8; CHUNK_LEN],
    hdr_done: usize,
    body: Option<Body>,
    /// The header names a message the comm does not know yet; the comm's
    /// kick count when the socket last asked for it.
    parked: Option<u64>,
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

/// The next send: up to two pieces (header rest, body rest), or a body
/// that leaves by devmem TX.
pub(super) struct TxPlan {
    pub parts: [(*const u8, usize); 2],
    pub n: usize,
    pub zerocopy: bool,
    pub devmem: Option<DevmemBody>,
}

/// The next receive: header rest and body rest.
pub(super) struct RxPlan {
    pub parts: [(*mut u8, usize); 2],
}

/// What one devmem receive step did.
pub(super) enum Step {
    Moved,
    WouldBlock,
    Idle,
}

pub(super) struct Sock {
    pub stream: TcpStream,
    devmem: Option<Box<DevmemRx>>,
    devmem_tx: Option<Box<DevmemTx>>,
    sends: VecDeque<Job>,
    tx: Cursor,
    rx: RxCursor,
    /// Chunks landed whose copies may still run, oldest first.
    unsettled: Vec<(Arc<Placement>, u64)>,
    comm: Arc<dyn CommLink>,
    receives: bool,
    peer_timeout_ms: u64,
    quickack: bool,
    pub readable: bool,
    pub writable: bool,
    pub dead: Option<Error>,
    pub zc: Zc,
}

/// The process logs the kernel's copying of zero-copy sends once.
static COPY_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Sock {
    pub fn new(
        stream: TcpStream,
        mode: TxMode,
        comm: Arc<dyn CommLink>,
        receives: bool,
        mut dead: Option<Error>,
        counters: &Arc<Counters>,
    ) -> Self {
        let enabled = mode.zerocopy != ZeroCopy::Off && enable_zerocopy(&stream);
        let devmem = match receives
            .then_some(mode.devmem)
            .flatten()
            .map(|spec| DevmemRx::new(&stream, spec, counters.clone()))
        {
            Some(Ok(d)) => Some(Box::new(d)),
            Some(Err(e)) => {
                dead.get_or_insert(e);
                None
            }
            None => None,
        };
        let devmem_tx = match (!receives)
            .then_some(mode.devmem_tx)
            .flatten()
            .map(|(nic, tx)| DevmemTx::new(&stream, nic, tx))
        {
            Some(Ok(d)) => Some(Box::new(d)),
            Some(Err(e)) => {
                dead.get_or_insert(e);
                None
            }
            None => None,
        };
        // The emulated NIC counts its own zero-copy ids: host MSG_ZEROCOPY
        // sends beside it would take the kernel's.
        let enabled = enabled && !devmem_tx.as_ref().is_some_and(|d| d.emulated);
        let (zerocopy, min_zcopy) = (mode.zerocopy, mode.min_zcopy);
        Sock {
            stream,
            devmem,
            devmem_tx,
            sends: VecDeque::new(),
            tx: Cursor::default(),
            rx: RxCursor {
                hdr: [0; CHUNK_LEN],
                hdr_done: 0,
                body: None,
                parked: None,
            },
            unsettled: Vec::new(),
            comm,
            receives,
            peer_timeout_ms: mode.peer_timeout_ms,
            quickack: mode.quickack,
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

    pub fn enqueue(&mut self, job: Job) {
        if let Some(e) = &self.dead {
            job.finish(Some(e.clone()));
        } else {
            self.sends.push_back(job);
        }
    }

    /// Fails the socket and its comm. Whatever may still write received
    /// bytes (unpack kernels, staging copies) finishes before the
    /// placements it writes are let go.
    pub fn fail(&mut self, e: Error) {
        if let Some(d) = self.devmem.as_mut() {
            d.quiesce();
        }
        let body = self.rx.body.take();
        let mut held: Vec<Arc<Placement>> = self.unsettled.drain(..).map(|(p, _)| p).collect();
        if let Some(Body {
            dst: Some(p), off, ..
        }) = body
        {
            p.unclaim(off);
            held.push(p);
        }
        for (i, p) in held.iter().enumerate() {
            if held[..i].iter().all(|q| !Arc::ptr_eq(&q.region, &p.region)) {
                let _ = p.region.settle();
            }
        }
        drop(held);
        let awaiting: Vec<Job> = self.zc.awaiting.drain(..).collect();
        for job in self.sends.drain(..).chain(awaiting) {
            job.finish(Some(e.clone()));
        }
        self.tx.active = false;
        if self.dead.is_none() {
            self.dead = Some(e.clone());
            self.comm.failed(e);
        }
    }

    pub fn wants_tx(&self) -> bool {
        self.dead.is_none() && !self.sends.is_empty()
    }

    pub fn wants_rx(&self) -> bool {
        self.dead.is_none() && self.receives
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
        let hdr_left = CHUNK_LEN - self.tx.hdr_done;
        if let Some(body) = self.devmem_tx.as_ref().and_then(|d| {
            let at = job.base + off + self.tx.body_done as u64;
            d.body(&job.region, at, len - self.tx.body_done)
        }) {
            // Header by a plain send (the next chunk rewrites it), then the body.
            return Some(if hdr_left > 0 {
                TxPlan {
                    parts: [
                        (self.tx.hdr[self.tx.hdr_done..].as_ptr(), hdr_left),
                        (std::ptr::null(), 0),
                    ],
                    n: 1,
                    zerocopy: false,
                    devmem: None,
                }
            } else {
                TxPlan {
                    parts: [(std::ptr::null(), 0); 2],
                    n: 0,
                    zerocopy: true,
                    devmem: Some(body),
                }
            });
        }
        let src = match job.region.source(job.base + off, len) {
            Ok(p) => p,
            Err(e) => {
                self.fail(e);
                return None;
            }
        };
        if starting {
            self.prefetch_next();
        }
        let body = (src.wrapping_add(self.tx.body_done), len - self.tx.body_done);
        let hdr = (self.tx.hdr[self.tx.hdr_done..].as_ptr(), hdr_left);
        let zc_chunk = self.zc.enabled && len >= self.zc.min && job.region.zerocopy_ok();
        Some(if hdr_left == 0 {
            TxPlan {
                parts: [body, (std::ptr::null(), 0)],
                n: 1,
                zerocopy: zc_chunk,
                devmem: None,
            }
        } else if zc_chunk {
            // With zero-copy the kernel reads the iovecs after the call returns, so the
            // header (which the next chunk overwrites) goes first in a copying send.
            TxPlan {
                parts: [hdr, (std::ptr::null(), 0)],
                n: 1,
                zerocopy: false,
                devmem: None,
            }
        } else {
            TxPlan {
                parts: [hdr, body],
                n: 2,
                zerocopy: false,
                devmem: None,
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
            job.region.prefetch(job.base + off, len);
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
            job.region.sent(job.base + job.chunk().0, len);
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

    /// Makes sense of a complete chunk header: where its body goes, or
    /// that the socket must wait for the comm to learn of its message.
    fn resolve(&mut self) {
        let c = match Chunk::decode(&self.rx.hdr) {
            Ok(c) => c,
            Err(e) => return self.fail(e),
        };
        let kicks = self.comm.kicks();
        let mut asked = self.rx.parked == Some(kicks);
        let dst = loop {
            match self.comm.lookup(c.seq) {
                Lookup::Place(p) => match p.claim(c.offset, c.len) {
                    Ok(true) => break Some(p),
                    Ok(false) => break None,
                    Err(e) => return self.fail(e),
                },
                Lookup::Discard => break None,
                // Ask (the control socket may hold the announcement unread),
                // look once more, then wait for the comm's next kick.
                Lookup::Unknown if !asked => {
                    self.rx.parked = Some(kicks);
                    asked = true;
                    self.comm.wait_for(c.seq);
                }
                Lookup::Unknown => return,
            }
        };
        self.rx.parked = None;
        self.rx.hdr_done = 0;
        self.rx.body = Some(Body {
            dst,
            off: c.offset,
            len: c.len as usize,
            done: 0,
            direct: false,
        });
        if c.len == 0 {
            self.finish_body();
        }
    }

    /// The header is still incomplete, or the body's destination is known
    /// (`false`: the socket waits for its comm).
    fn rx_ready(&mut self) -> bool {
        if self.dead.is_some() || !self.receives {
            return false;
        }
        if self.rx.body.is_none() && self.rx.hdr_done == CHUNK_LEN {
            self.resolve();
        }
        self.dead.is_none() && (self.rx.body.is_some() || self.rx.hdr_done < CHUNK_LEN)
    }

    /// Where to receive next: the rest of the body and then the next
    /// header, or the rest of the header; `None` when the socket waits.
    pub fn rx_plan(&mut self, scratch: &mut Vec<u8>) -> Option<RxPlan> {
        if !self.rx_ready() {
            return None;
        }
        let hdr_done = self.rx.hdr_done;
        let hdr = (self.rx.hdr[hdr_done..].as_mut_ptr(), CHUNK_LEN - hdr_done);
        let Some(b) = self.rx.body.as_ref() else {
            return Some(RxPlan {
                parts: [hdr, (std::ptr::null_mut(), 0)],
            });
        };
        let want = b.len - b.done;
        let body = match &b.dst {
            Some(p) => match p.region.sink(p.base + b.off + b.done as u64, want) {
                Ok(ptr) => (ptr, want),
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
        // The next header may come in the same read, once the body is whole.
        let next = if body.1 == want {
            hdr
        } else {
            (std::ptr::null_mut(), 0)
        };
        Some(RxPlan {
            parts: [body, next],
        })
    }

    /// `n` bytes arrived for the last plan (0 = the peer closed).
    pub fn rx_done(&mut self, n: usize) {
        if n == 0 {
            self.fail(Error::ConnectionLost("peer closed a data socket".into()));
            return;
        }
        let mut rest = n;
        if let Some(b) = self.rx.body.as_mut() {
            let took = rest.min(b.len - b.done);
            b.done += took;
            rest -= took;
            if b.done == b.len {
                self.finish_body();
            }
        }
        self.rx.hdr_done = (self.rx.hdr_done + rest).min(CHUNK_LEN);
        if self.rx.body.is_none() && self.rx.hdr_done == CHUNK_LEN {
            self.resolve();
        }
    }

    /// The body of the current chunk is received: lands it, and counts it
    /// in place now or once its copies settle.
    fn finish_body(&mut self) {
        let Some(b) = self.rx.body.take() else {
            return;
        };
        if self.quickack && self.rx.hdr_done == 0 {
            // The kernel leaves quick-ACK mode on its own; set it again each time.
            let _ = SockRef::from(&self.stream).set_quickack(true);
        }
        let Some(p) = b.dst else {
            return;
        };
        if !b.direct {
            if let Err(e) = p.region.landed(p.base + b.off, b.len) {
                p.unclaim(b.off);
                return self.fail(e);
            }
        }
        if self.devmem.is_some() || p.region.stages() {
            self.unsettled.push((p, b.off));
            if self.unsettled.len() >= MAX_UNSETTLED {
                self.settle();
            }
        } else {
            p.chunk_placed();
        }
    }

    /// Waits for the copies of landed chunks and counts them in place.
    /// True if any were waiting.
    pub fn settle(&mut self) -> bool {
        if self.unsettled.is_empty() {
            return false;
        }
        let mut settled = self.devmem.as_mut().map_or(Ok(()), |d| d.settle());
        for (i, (p, _)) in self.unsettled.iter().enumerate() {
            let seen = self.unsettled[..i]
                .iter()
                .any(|(q, _)| Arc::ptr_eq(&q.region, &p.region));
            if !seen && settled.is_ok() {
                settled = p.region.settle();
            }
        }
        match settled {
            Ok(()) => {
                for (p, _) in self.unsettled.drain(..) {
                    p.chunk_placed();
                }
            }
            Err(e) => self.fail(e),
        }
        true
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

    /// One devmem send of the planned body: bytes sent and the zero-copy id.
    pub fn send_devmem(&mut self, body: &DevmemBody, counters: &Counters) -> Result<usize, Errno> {
        let Some(d) = self.devmem_tx.as_mut() else {
            return Err(Errno::EINVAL);
        };
        let n = d
            .send(body)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        Counters::bump(&counters.devmem_tx_sends, 1);
        Counters::bump(&counters.devmem_tx_bytes, n as u64);
        Ok(n)
    }

    /// Whether devmem sends wait for completions (the emulated NIC raises
    /// no EPOLLERR: the engine polls).
    pub fn devmem_tx_pending(&self) -> bool {
        self.devmem_tx.is_some() && self.zc.tracker.outstanding() > 0
    }

    /// Reads the devmem socket's completions and finishes the jobs they
    /// cover. True if any finished.
    pub fn drain_devmem_tx(&mut self, counters: &Counters) -> Option<bool> {
        let d = self.devmem_tx.as_mut()?;
        let mut done = Vec::new();
        if let Err(e) = d.completions(&mut done) {
            self.fail(e);
            return Some(false);
        }
        for z in done {
            Counters::bump(&counters.devmem_tx_completed, z.count());
            self.zc_completed(
                zerocopy::Completion {
                    lo: z.lo,
                    hi: z.hi,
                    copied: z.copied,
                },
                counters,
            );
        }
        Some(self.release_zc())
    }

    /// One receive through the devmem socket into the chunk being
    /// received (header and body are read separately: each read asks for at
    /// most what its part still needs); see `devmem_rx` for where the
    /// payload goes and when its tokens go back.
    pub fn rx_devmem(&mut self, scratch: &mut Vec<u8>) -> Step {
        let Some(target) = self.rx_target(scratch) else {
            return Step::Idle;
        };
        let Some(d) = self.devmem.as_mut() else {
            return Step::Idle;
        };
        let dst = match target {
            // SAFETY: the target is valid for writes while its placement holds the region.
            RxRoute::Host(p, len) => Dst::Host(unsafe { super::bytes_mut(p, len) }),
            RxRoute::Device(span) => Dst::Device(span),
        };
        match d.recv(dst) {
            Ok(Recv::Bytes(n)) => self.rx_done(n),
            Ok(Recv::Closed) => self.rx_done(0),
            Ok(Recv::WouldBlock) => return Step::WouldBlock,
            Ok(Recv::Interrupted) => {}
            Err(e) => {
                self.fail(e);
                return Step::Idle;
            }
        }
        Step::Moved
    }

    /// Where the next devmem receive goes: the rest of the chunk header,
    /// else the rest of the body: device memory when the pool and the region
    /// are on the same GPU, else host-addressable memory.
    fn rx_target(&mut self, scratch: &mut Vec<u8>) -> Option<RxRoute> {
        if !self.rx_ready() {
            return None;
        }
        let pool_gpu = self.devmem.as_ref().and_then(|d| d.gpu_ordinal());
        let Some(b) = self.rx.body.as_mut() else {
            let h = self.rx.hdr_done;
            return Some(RxRoute::Host(self.rx.hdr[h..].as_mut_ptr(), CHUNK_LEN - h));
        };
        let want = b.len - b.done;
        let target = match b.dst.as_ref() {
            None => {
                if scratch.is_empty() {
                    scratch.resize(SCRATCH_LEN, 0);
                }
                Ok(RxRoute::Host(scratch.as_mut_ptr(), want.min(scratch.len())))
            }
            Some(p) => rx_route(pool_gpu, &p.region, p.base + b.off + b.done as u64, want),
        };
        b.direct = matches!(target, Ok(RxRoute::Device(_)));
        match target {
            Ok(t) => Some(t),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    pub fn tx_failed(&mut self, e: Errno) {
        let err = self.io_error("send", e);
        self.fail(err);
    }

    pub fn rx_failed(&mut self, e: Errno) {
        let err = self.io_error("recv", e);
        self.fail(err);
    }

    /// ETIMEDOUT on a data socket is TCP_USER_TIMEOUT: the peer stopped acknowledging.
    fn io_error(&self, op: &'static str, e: Errno) -> Error {
        if e == Errno::ETIMEDOUT {
            Error::PeerUnresponsive {
                after_ms: self.peer_timeout_ms,
            }
        } else {
            Error::io(op, e.into())
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::devmem_rx::tests::{loaded, pattern, Manual};
    use crate::gpumemd::PoolSource;
    use crate::memory::{HostMemory, MemoryRegion};
    use crate::path::DevmemSpec;
    use crate::request::ReqState;
    use devmem::sockabi::KernelAbi;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A receive comm that knows one message, number 7.
    #[derive(Default)]
    struct OneMessage {
        placement: Mutex<Option<Arc<Placement>>>,
        err: Mutex<Option<Error>>,
    }

    impl CommLink for OneMessage {
        fn failed(&self, e: Error) {
            self.err.lock().unwrap().get_or_insert(e);
            self.placement.lock().unwrap().take();
        }
        fn lookup(&self, seq: u64) -> Lookup {
            match self.placement.lock().unwrap().clone() {
                Some(p) if seq == 7 => Lookup::Place(p),
                _ => Lookup::Discard,
            }
        }
        fn completed(&self, _: u64) {
            self.placement.lock().unwrap().take();
        }
        fn failure(&self) -> Error {
            self.err.lock().unwrap().clone().unwrap_or(Error::Closed)
        }
    }

    /// Receives one `n`-byte chunk through an emulated devmem socket whose
    /// gathers finish when `gather` says; returns the request and its memory.
    fn receive(gather: &Manual, deadline: Duration, n: usize) -> (Arc<ReqState>, MemoryRegion) {
        let mut wire = Chunk {
            seq: 7,
            offset: 0,
            len: n as u32,
        }
        .encode()
        .to_vec();
        wire.extend(pattern(n));
        let (stream, _peer) = loaded(&wire);
        // Idle sockets settle: a read that would block must say so at once.
        stream.set_nonblocking(true).unwrap();
        let mode = TxMode {
            zerocopy: ZeroCopy::Off,
            min_zcopy: 0,
            devmem: Some(DevmemSpec::Emulated {
                abi: KernelAbi::Tcpx,
                source: PoolSource::Local(1 << 20),
                poison: true,
            }),
            devmem_tx: None,
            peer_timeout_ms: 0,
            quickack: false,
        };
        let comm = Arc::new(OneMessage::default());
        let mut s = Sock::new(
            stream,
            mode,
            comm.clone(),
            true,
            None,
            &Arc::new(Counters::default()),
        );
        if let Some(d) = s.devmem.as_mut() {
            d.set_gather(Box::new(gather.clone()), deadline);
        }
        let mr = MemoryRegion::owned(HostMemory::zeroed(n).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Placement::new(
            7,
            mr.inner.clone(),
            0,
            n as u64,
            n as u64,
            req.clone(),
            comm.clone(),
        );
        *comm.placement.lock().unwrap() = Some(Arc::new(p));
        let mut scratch = Vec::new();
        while !req.is_done() {
            match s.rx_devmem(&mut scratch) {
                Step::Moved => {}
                Step::WouldBlock | Step::Idle => {
                    assert!(s.settle(), "stalled before the request was done")
                }
            }
        }
        (req, mr)
    }

    #[test]
    fn a_devmem_receive_is_done_only_once_its_unpack_finished() {
        // An unpack that never finishes: the request fails (typed), it
        // never reports success with bytes still in flight.
        let (req, _) = receive(&Manual::default(), Duration::from_millis(100), 600_001);
        assert!(
            matches!(req.error(), Some(Error::Timeout { .. })),
            "{:?}",
            req.error()
        );

        // One that finishes later: done after it, byte-exact.
        let m = Manual::default();
        let finished = Arc::new(AtomicBool::new(false));
        let (m2, f2) = (m.clone(), finished.clone());
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f2.store(true, Ordering::SeqCst);
            m2.finish_all();
        });
        let (req, mut mr) = receive(&m, Duration::from_secs(5), 600_001);
        assert!(
            finished.load(Ordering::SeqCst),
            "done before the unpack finished"
        );
        assert_eq!(req.error(), None);
        finisher.join().unwrap();
        assert!(mr.bytes().unwrap() == &pattern(600_001)[..]);
    }

    /// A receive comm for the plain path: message 3 (two chunks of 4096 in
    /// 6000 bytes) is known only after `announce`; below 3 is done.
    struct Late {
        placement: Mutex<Option<Arc<Placement>>>,
        known: AtomicBool,
        waits: std::sync::atomic::AtomicUsize,
        kicks: std::sync::atomic::AtomicU64,
        err: Mutex<Option<Error>>,
    }

    impl CommLink for Late {
        fn failed(&self, e: Error) {
            self.err.lock().unwrap().get_or_insert(e);
        }
        fn lookup(&self, seq: u64) -> Lookup {
            match (seq, self.known.load(Ordering::SeqCst)) {
                (3, true) => self
                    .placement
                    .lock()
                    .unwrap()
                    .clone()
                    .map_or(Lookup::Discard, Lookup::Place),
                (3, false) | (4.., _) => Lookup::Unknown,
                _ => Lookup::Discard,
            }
        }
        fn wait_for(&self, _: u64) {
            self.waits.fetch_add(1, Ordering::SeqCst);
        }
        fn kicks(&self) -> u64 {
            self.kicks.load(Ordering::SeqCst)
        }
        fn completed(&self, _: u64) {
            self.placement.lock().unwrap().take();
        }
    }

    fn chunk(seq: u64, offset: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Chunk {
            seq,
            offset,
            len: body.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(body);
        v
    }

    /// Reads until the socket waits or has nothing; true if it read.
    fn pump(s: &mut Sock, scratch: &mut Vec<u8>) -> bool {
        use std::io::IoSliceMut;
        let mut moved = false;
        while let Some(plan) = s.rx_plan(scratch) {
            let [(p0, l0), (p1, l1)] = plan.parts;
            // SAFETY: the plan's parts are valid for writes while their placement holds the region.
            let mut iov = unsafe {
                [
                    IoSliceMut::new(crate::engine::bytes_mut(p0, l0)),
                    IoSliceMut::new(crate::engine::bytes_mut(p1, l1)),
                ]
            };
            match nix::sys::uio::readv(&s.stream, &mut iov) {
                Ok(n) => {
                    moved = true;
                    s.rx_done(n)
                }
                Err(_) => break,
            }
        }
        moved
    }

    #[test]
    fn chunks_wait_for_their_announcement_and_duplicates_and_old_ones_are_dropped() {
        let data = pattern(6000);
        let mut wire = chunk(1, 0, &[7; 100]); // an old message: dropped
        wire.extend(chunk(3, 4096, &data[4096..]));
        wire.extend(chunk(3, 4096, &[0xEE; 1904])); // a duplicate: dropped
        wire.extend(chunk(3, 0, &data[..4096]));
        let (stream, _peer) = loaded(&wire);
        stream.set_nonblocking(true).unwrap();
        let comm = Arc::new(Late {
            placement: Mutex::new(None),
            known: AtomicBool::new(false),
            waits: Default::default(),
            kicks: Default::default(),
            err: Mutex::new(None),
        });
        let mode = TxMode {
            zerocopy: ZeroCopy::Off,
            min_zcopy: 0,
            devmem: None,
            devmem_tx: None,
            peer_timeout_ms: 0,
            quickack: false,
        };
        let mut s = Sock::new(
            stream,
            mode,
            comm.clone(),
            true,
            None,
            &Arc::new(Counters::default()),
        );
        let mut mr = MemoryRegion::owned(HostMemory::zeroed(6000).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Placement::new(
            3,
            mr.inner.clone(),
            0,
            6000,
            4096,
            req.clone(),
            comm.clone(),
        );
        *comm.placement.lock().unwrap() = Some(Arc::new(p));
        let mut scratch = Vec::new();
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut scratch);
        assert_eq!(
            comm.waits.load(Ordering::SeqCst),
            1,
            "it asked the comm once"
        );
        assert!(s.rx_plan(&mut scratch).is_none(), "and waits");
        assert_eq!(comm.waits.load(Ordering::SeqCst), 1, "without asking again");
        comm.kicks.fetch_add(1, Ordering::SeqCst);
        assert!(s.rx_plan(&mut scratch).is_none());
        assert_eq!(
            comm.waits.load(Ordering::SeqCst),
            2,
            "a kick that did not bring it: ask again"
        );
        comm.known.store(true, Ordering::SeqCst);
        comm.kicks.fetch_add(1, Ordering::SeqCst);
        while !req.is_done() {
            assert!(pump(&mut s, &mut scratch), "stalled");
        }
        assert_eq!(req.error(), None);
        assert!(comm.err.lock().unwrap().is_none());
        assert!(mr.bytes().unwrap() == &data[..]);
    }

    #[test]
    fn a_chunk_off_the_message_geometry_fails_the_comm() {
        let (stream, _peer) = loaded(&chunk(3, 100, &[1; 50]));
        stream.set_nonblocking(true).unwrap();
        let comm = Arc::new(Late {
            placement: Mutex::new(None),
            known: AtomicBool::new(true),
            waits: Default::default(),
            kicks: Default::default(),
            err: Mutex::new(None),
        });
        let mode = TxMode {
            zerocopy: ZeroCopy::Off,
            min_zcopy: 0,
            devmem: None,
            devmem_tx: None,
            peer_timeout_ms: 0,
            quickack: false,
        };
        let mut s = Sock::new(
            stream,
            mode,
            comm.clone(),
            true,
            None,
            &Arc::new(Counters::default()),
        );
        let mr = MemoryRegion::owned(HostMemory::zeroed(6000).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Placement::new(
            3,
            mr.inner.clone(),
            0,
            6000,
            4096,
            req.clone(),
            comm.clone(),
        );
        *comm.placement.lock().unwrap() = Some(Arc::new(p));
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut Vec::new());
        assert!(matches!(
            *comm.err.lock().unwrap(),
            Some(Error::Protocol(_))
        ));
        assert!(s.dead.is_some());
    }

    #[test]
    fn force_ack_sets_quick_ack_after_each_chunk() {
        for on in [false, true] {
            let (stream, _peer) = loaded(&chunk(3, 0, &pattern(6000)[..4096]));
            stream.set_nonblocking(true).unwrap();
            // Delayed-ACK mode, as the kernel has it after a while.
            SockRef::from(&stream).set_quickack(false).unwrap();
            let comm = Arc::new(Late {
                placement: Mutex::new(None),
                known: AtomicBool::new(true),
                waits: Default::default(),
                kicks: Default::default(),
                err: Mutex::new(None),
            });
            let mode = TxMode {
                zerocopy: ZeroCopy::Off,
                min_zcopy: 0,
                devmem: None,
                devmem_tx: None,
                peer_timeout_ms: 0,
                quickack: on,
            };
            let mut s = Sock::new(
                stream,
                mode,
                comm.clone(),
                true,
                None,
                &Arc::new(Counters::default()),
            );
            let mr = MemoryRegion::owned(HostMemory::zeroed(6000).unwrap());
            let req = Arc::new(ReqState::new(1, 1));
            let p = Placement::new(3, mr.inner.clone(), 0, 6000, 4096, req, comm.clone());
            *comm.placement.lock().unwrap() = Some(Arc::new(p));
            std::thread::sleep(Duration::from_millis(20));
            pump(&mut s, &mut Vec::new());
            assert_eq!(
                SockRef::from(&s.stream).quickack().unwrap(),
                on,
                "force_ack {on}"
            );
        }
    }
}
