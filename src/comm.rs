//! Send and receive comms, and the requests they hand out.
//!
//! The control socket is driven by the caller's own thread inside
//! `isend`/`irecv`/`test` (small messages never leave that thread, which
//! keeps latency at raw-TCP level); chunks of large messages go to the
//! NIC workers.

use std::collections::VecDeque;
use std::io::{IoSlice, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use flowsteer::RuleHandle;
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use crate::config::{MAX_INLINE, MAX_RECVS};
use crate::engine::{Cmd, Job, Poke};
use crate::error::{Error, Result};
use crate::memory::{MemoryRegion, PtrKind, Region, RxPath, TxPath};
use crate::net::NetInner;
use crate::request::{FdWaker, ReqState, Sizes};
use crate::wire::{self, Kind, Msg, MSG_INLINE, MSG_LEN, PREFIX_LEN};

/// How long `wait` polls before it sleeps: small messages finish within it,
/// saving the two thread wake-ups of the sleeping path.
const SPIN: Duration = Duration::from_micros(50);

/// Smallest chunk of a CUDA message cut across sockets. Measured: a 256
/// KiB message in two 128 KiB chunks went 0.77x -> 0.89x of host TCP; more
/// chunks per socket (4 of at least 128 KiB) cost 1-4 MiB messages
/// 0.76-0.83x -> 0.61-0.72x, so each socket gets one.
const MIN_CUDA_CHUNK: usize = 128 << 10;

/// Largest chunk a peer may announce.
const MAX_CHUNK: u64 = 1 << 30;

/// A data socket of a comm: which worker owns it, and its id there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataSock {
    pub worker: usize,
    pub id: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- send side

struct SendCtrl {
    stream: TcpStream,
    /// Control bytes not yet accepted by the kernel.
    out: Vec<u8>,
    out_at: usize,
    seq: u64,
    /// Data socket that carries the next message's first chunk.
    cursor: usize,
    broken: Option<Error>,
}

impl SendCtrl {
    /// Writes what is queued and then `parts` in one call, and queues
    /// whatever the kernel does not take.
    fn send_or_queue(&mut self, parts: &[&[u8]]) {
        let mut skip = 0;
        let queued = self.out.len() - self.out_at;
        if self.broken.is_none() {
            let mut iov: Vec<IoSlice> = Vec::with_capacity(parts.len() + 1);
            if queued > 0 {
                iov.push(IoSlice::new(&self.out[self.out_at..]));
            }
            iov.extend(parts.iter().map(|p| IoSlice::new(p)));
            let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            match nix::sys::socket::sendmsg::<()>(self.stream.as_raw_fd(), &iov, &[], flags, None) {
                Ok(n) if n >= queued => {
                    self.out.clear();
                    self.out_at = 0;
                    skip = n - queued;
                }
                Ok(n) => self.out_at += n,
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => self.broken = Some(Error::io("send control", e.into())),
            }
        }
        self.queue(parts, skip);
    }

    /// Queues `parts` minus their first `skip` bytes (already sent).
    fn queue(&mut self, parts: &[&[u8]], mut skip: usize) {
        if self.flushed() {
            self.out.clear();
            self.out_at = 0;
        }
        for p in parts {
            let s = skip.min(p.len());
            self.out.extend_from_slice(&p[s..]);
            skip -= s;
        }
    }

    fn flush(&mut self) {
        while self.out_at < self.out.len() && self.broken.is_none() {
            let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            match nix::sys::socket::send(self.stream.as_raw_fd(), &self.out[self.out_at..], flags) {
                Ok(n) => self.out_at += n,
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => {}
                Err(e) => self.broken = Some(Error::io("send control", e.into())),
            }
        }
    }

    fn flushed(&self) -> bool {
        self.out_at == self.out.len()
    }
}

/// What send and receive comms share: their sockets and slot accounting.
struct CommBase {
    net: Arc<NetInner>,
    socks: Vec<DataSock>,
    /// The worker's watch on the control socket.
    watch: OnceLock<DataSock>,
    inflight: AtomicUsize,
    closed: AtomicBool,
}

impl CommBase {
    fn new(net: Arc<NetInner>, socks: Vec<DataSock>) -> Self {
        CommBase {
            net,
            socks,
            watch: OnceLock::new(),
            inflight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Has the first data socket's worker poke `core` when `stream` turns readable (or writable, `out`).
    fn watch<C: Poke + 'static>(
        core: &Arc<C>,
        base: &CommBase,
        stream: &TcpStream,
        out: bool,
    ) -> Result<()> {
        let worker = base.socks.first().map_or(0, |s| s.worker);
        let target: Weak<dyn Poke> = Arc::downgrade(core) as Weak<dyn Poke>;
        let w = base.net.watch(worker, stream, out, target)?;
        let _ = base.watch.set(w);
        Ok(())
    }

    fn close_data(&self) {
        for s in self.socks.iter().chain(self.watch.get()) {
            self.net.workers[s.worker].submit(Cmd::Close { id: s.id });
        }
    }
}

pub(crate) struct SendCore {
    base: CommBase,
    ctrl: Mutex<SendCtrl>,
}

/// The sending end of a connection (from `Net::connect`).
pub struct SendComm {
    core: Arc<SendCore>,
}

impl std::fmt::Debug for SendComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendComm({} data sockets)", self.core.base.socks.len())
    }
}

impl SendComm {
    pub(crate) fn new(net: Arc<NetInner>, ctrl: TcpStream, socks: Vec<DataSock>) -> Result<Self> {
        let core = Arc::new(SendCore {
            base: CommBase::new(net, socks),
            ctrl: Mutex::new(SendCtrl {
                stream: ctrl,
                out: Vec::new(),
                out_at: 0,
                seq: 0,
                cursor: 0,
                broken: None,
            }),
        });
        // Queued control bytes leave as soon as the socket drains, polled or not.
        CommBase::watch(&core, &core.base, &lock(&core.ctrl).stream, true)?;
        Ok(SendComm { core })
    }

    /// Number of data sockets this comm stripes over.
    pub fn data_sockets(&self) -> usize {
        self.core.base.socks.len()
    }

    /// Starts sending `len` bytes at `offset` of `mr` with `tag`.
    /// `Ok(None)`: every request slot is busy; test() some and try again.
    pub fn isend(
        &self,
        mr: &MemoryRegion,
        offset: usize,
        len: usize,
        tag: i32,
    ) -> Result<Option<Request>> {
        self.post(mr, offset, len, tag, false)
    }

    /// [`SendComm::isend`] for a message that another follows at once: a
    /// small one (inline, up to `inline_threshold`) waits in the control
    /// buffer and leaves with the next `isend` in one system call, so the
    /// peer wakes once for both. Follow it with an `isend` (a test of this
    /// request also sends it).
    pub fn isend_more(
        &self,
        mr: &MemoryRegion,
        offset: usize,
        len: usize,
        tag: i32,
    ) -> Result<Option<Request>> {
        self.post(mr, offset, len, tag, true)
    }

    fn post(
        &self,
        mr: &MemoryRegion,
        offset: usize,
        len: usize,
        tag: i32,
        more: bool,
    ) -> Result<Option<Request>> {
        let core = &self.core;
        if core.base.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        check_range(mr, offset, len)?;
        let cfg = &core.base.net.cfg;
        if core.base.inflight.load(Ordering::Acquire) >= cfg.max_requests {
            return Ok(None);
        }
        let mut c = lock(&core.ctrl);
        if let Some(e) = &c.broken {
            return Err(e.clone());
        }
        let n = core.base.socks.len();
        let inline = len <= cfg.inline_threshold || len == 0;
        let chunk = match mr.inner.kind() {
            PtrKind::Host => cfg.chunk_size,
            // Large chunks amortize each staging copy's fixed cost, but not
            // at the price of idle sockets: a message spans all of them.
            PtrKind::Cuda => len
                .div_ceil(n)
                .next_multiple_of(4096)
                .clamp(MIN_CUDA_CHUNK.min(cfg.cuda_chunk_size), cfg.cuda_chunk_size),
        };
        let msg = Msg {
            seq: c.seq,
            size: len as u64,
            tag,
            chunk_size: chunk as u32,
            first_socket: c.cursor as u16,
            flags: if inline { MSG_INLINE } else { 0 },
        };
        c.seq += 1;
        let hdr = msg.encode();
        let state = if inline {
            let src = mr.inner.source(offset as u64, len)?;
            // SAFETY: TxPath hands out `len` readable bytes; the region is held by `mr` for this call.
            let body = unsafe { bytes(src, len) };
            if more {
                c.queue(&[&hdr, body], 0);
            } else {
                c.send_or_queue(&[&hdr, body]);
            }
            // Sent or queued, the bytes were copied: staging may be reused.
            mr.inner.sent(offset as u64, len);
            Arc::new(ReqState::new(1, 0))
        } else {
            c.send_or_queue(&[&hdr]);
            let cs = chunk as u64;
            let plan: Vec<_> = Job::plan(len as u64, cs, c.cursor, n).collect();
            c.cursor = (c.cursor + Job::n_chunks(len as u64, cs) as usize) % n;
            let state = Arc::new(ReqState::new(1, plan.len()));
            for (s, first) in plan {
                let sock = core.base.socks[s];
                core.base.net.workers[sock.worker].submit(Cmd::Send {
                    id: sock.id,
                    job: Job {
                        req: state.clone(),
                        region: Some(mr.inner.clone()),
                        base: offset as u64,
                        seq: msg.seq,
                        size: len as u64,
                        chunk_size: cs,
                        next_chunk: first,
                        stride: n as u64,
                        zc_last: None,
                    },
                });
            }
            state
        };
        state.set_size(0, len as u64);
        core.base.inflight.fetch_add(1, Ordering::AcqRel);
        Ok(Some(Request::new(state, Owner::Send(core.clone()))))
    }

    /// Closes the comm; requests still in flight fail with `Error::Closed`.
    pub fn close(self) {}
}

impl Drop for SendComm {
    fn drop(&mut self) {
        let core = &self.core;
        core.base.closed.store(true, Ordering::Release);
        {
            // Give queued control bytes a brief chance to leave, so that completed
            // sends are not lost; never block on a peer that stopped reading.
            let mut c = lock(&core.ctrl);
            let deadline = Instant::now() + Duration::from_millis(200);
            while !c.flushed() && c.broken.is_none() && Instant::now() < deadline {
                c.flush();
                if !c.flushed() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        core.base.close_data();
    }
}

fn check_range(mr: &MemoryRegion, offset: usize, len: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= mr.len() => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "bytes {offset}+{len} outside the {}-byte region",
            mr.len()
        ))),
    }
}

/// # Safety
/// `p` must be valid for reads of `len` bytes for the returned lifetime.
unsafe fn bytes<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(p, len) }
}

// ------------------------------------------------------------- receive side

/// One buffer of a (grouped) receive.
#[derive(Debug, Clone, Copy)]
pub struct RecvBuf<'a> {
    pub mr: &'a MemoryRegion,
    pub offset: usize,
    pub len: usize,
    pub tag: i32,
}

struct Sub {
    region: Arc<Region>,
    offset: u64,
    len: u64,
    tag: i32,
    matched: bool,
}

struct Posted {
    state: Arc<ReqState>,
    subs: Vec<Sub>,
    unmatched: usize,
}

struct RecvCtrl {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    posted: VecDeque<Posted>,
    next_seq: u64,
    broken: Option<Error>,
}

impl RecvCtrl {
    /// Reads more control bytes; false when none are available now.
    fn fill(&mut self) -> bool {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        match (&self.stream).read(&mut self.buf[end..]) {
            Ok(0) => {
                self.broken = Some(Error::ConnectionLost(
                    "peer closed the control connection".into(),
                ));
                true
            }
            Ok(n) => {
                self.end += n;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(e) => {
                self.broken = Some(Error::io("recv control", e));
                true
            }
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

pub(crate) struct RecvCore {
    base: CommBase,
    ctrl: Mutex<RecvCtrl>,
    /// Callers spinning in `Request::wait` on this comm.
    spinners: AtomicUsize,
    /// Flow-steering rules of the data sockets; withdrawn on close.
    flows: Mutex<Vec<RuleHandle>>,
    /// Set once the owner drives the comm (`take_over_progress`).
    waker: OnceLock<Arc<FdWaker>>,
}

/// The receiving end of a connection (from `ListenComm::accept`).
pub struct RecvComm {
    core: Arc<RecvCore>,
}

impl std::fmt::Debug for RecvComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvComm({} data sockets)", self.core.base.socks.len())
    }
}

impl RecvComm {
    pub(crate) fn new(
        net: Arc<NetInner>,
        ctrl: TcpStream,
        socks: Vec<DataSock>,
        flows: Vec<RuleHandle>,
    ) -> Result<Self> {
        let core = Arc::new(RecvCore {
            base: CommBase::new(net, socks),
            ctrl: Mutex::new(RecvCtrl {
                stream: ctrl,
                buf: vec![0; 2 * (MSG_LEN + MAX_INLINE)],
                start: 0,
                end: 0,
                posted: VecDeque::new(),
                next_seq: 0,
                broken: None,
            }),
            spinners: AtomicUsize::new(0),
            flows: Mutex::new(flows),
            waker: OnceLock::new(),
        });
        // Announced messages are matched as they arrive, even while the caller
        // waits on something else (a single-threaded sender waiting on its send).
        CommBase::watch(&core, &core.base, &lock(&core.ctrl).stream, false)?;
        Ok(RecvComm { core })
    }

    pub fn data_sockets(&self) -> usize {
        self.core.base.socks.len()
    }

    /// Posts a receive of up to 8 buffers; each takes the next message whose tag matches it.
    /// `Ok(None)`: every request slot is busy.
    pub fn irecv(&self, bufs: &[RecvBuf<'_>]) -> Result<Option<Request>> {
        let core = &self.core;
        if core.base.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if bufs.is_empty() || bufs.len() > MAX_RECVS {
            return Err(Error::InvalidArgument(format!(
                "a receive takes 1..={MAX_RECVS} buffers, got {}",
                bufs.len()
            )));
        }
        for b in bufs {
            check_range(b.mr, b.offset, b.len)?;
        }
        if core.base.inflight.load(Ordering::Acquire) >= core.base.net.cfg.max_requests {
            return Ok(None);
        }
        let state =
            Arc::new(ReqState::new(bufs.len(), bufs.len()).with_waker(core.waker.get().cloned()));
        let posted = Posted {
            state: state.clone(),
            subs: bufs
                .iter()
                .map(|b| Sub {
                    region: b.mr.inner.clone(),
                    offset: b.offset as u64,
                    len: b.len as u64,
                    tag: b.tag,
                    matched: false,
                })
                .collect(),
            unmatched: bufs.len(),
        };
        let mut c = lock(&core.ctrl);
        if let Some(e) = &c.broken {
            return Err(e.clone());
        }
        c.posted.push_back(posted);
        core.progress(&mut c);
        core.base.inflight.fetch_add(1, Ordering::AcqRel);
        Ok(Some(Request::new(state, Owner::Recv(core.clone()))))
    }

    /// Makes the owner's threads the only ones that read this comm's control
    /// socket: the NIC worker stops watching it, so an arriving message wakes
    /// just the thread sleeping in [`RecvComm::wait_progress`] (one wake-up
    /// instead of the worker's and then the waiter's). From then on
    /// announcements are read only inside `irecv`, `test` and
    /// `wait_progress`: the owner must keep calling one of them.
    pub fn take_over_progress(&self) -> Result<()> {
        let core = &self.core;
        let waker = FdWaker::new().map_err(|e| Error::io("eventfd", e))?;
        if core.waker.set(Arc::new(waker)).is_ok() {
            if let Some(w) = core.base.watch.get() {
                core.base.net.workers[w.worker].submit(Cmd::Close { id: w.id });
            }
        }
        Ok(())
    }

    /// Sleeps until the request behind `w` moves or `timeout` passes,
    /// reading announcements from the control socket meanwhile. After
    /// [`RecvComm::take_over_progress`] this sleeps in poll(2) on the
    /// control socket and the comm's eventfd; otherwise it is [`Waiter::wait`].
    pub fn wait_progress(&self, w: &Waiter, timeout: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::{AsFd, BorrowedFd};
        let core = &self.core;
        let Some(waker) = core.waker.get() else {
            return w.wait(timeout);
        };
        let deadline = Instant::now() + timeout;
        loop {
            waker.armed.store(true, Ordering::SeqCst);
            let (ctrl, announcements_wanted) = {
                let mut c = lock(&core.ctrl);
                core.progress(&mut c);
                (c.stream.as_raw_fd(), !c.posted.is_empty())
            };
            let now = Instant::now();
            if w.ready() || now >= deadline {
                break;
            }
            // SAFETY: the stream stays open while `self`, which owns it, lives.
            let ctrl = unsafe { BorrowedFd::borrow_raw(ctrl) };
            let mut fds = vec![PollFd::new(waker.efd.as_fd(), PollFlags::POLLIN)];
            // With no receive to match, unread announcements would keep the
            // socket readable and the poll spinning: they wait for the next irecv.
            if announcements_wanted {
                fds.push(PollFd::new(ctrl, PollFlags::POLLIN));
            }
            let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            );
            waker.drain();
        }
        waker.armed.store(false, Ordering::SeqCst);
    }

    /// Completes once received data is visible to the consumer. Host memory
    /// needs no flush, and CUDA (bounce) receives complete only after their
    /// host-to-device copies finished, so the request is done at once.
    pub fn iflush(&self, _bufs: &[RecvBuf<'_>]) -> Result<Option<Request>> {
        if self.core.base.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(Some(Request::new(
            Arc::new(ReqState::new(0, 0)),
            Owner::None,
        )))
    }

    pub fn close(self) {}
}

impl Drop for RecvComm {
    fn drop(&mut self) {
        let core = &self.core;
        core.base.closed.store(true, Ordering::Release);
        let mut c = lock(&core.ctrl);
        for p in c.posted.drain(..) {
            p.state.set_error(Error::Closed);
        }
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        drop(c);
        core.base.close_data();
        for f in lock(&core.flows).drain(..) {
            if let Err(e) = f.remove() {
                tracing::warn!("withdrawing a flow-steering rule: {e}");
            }
        }
    }
}

impl Poke for SendCore {
    fn poke(&self) {
        lock(&self.ctrl).flush();
    }
}

impl Poke for RecvCore {
    fn poke(&self) {
        // A caller spinning in wait() polls within microseconds; stay out of its way.
        if self.spinners.load(Ordering::Acquire) > 0 {
            return;
        }
        let mut c = lock(&self.ctrl);
        self.progress(&mut c);
    }
}

impl RecvCore {
    /// Matches announced messages to posted receives and dispatches their chunks.
    fn progress(&self, c: &mut RecvCtrl) {
        loop {
            if let Some(e) = c.broken.clone() {
                for p in c.posted.drain(..) {
                    p.state.set_error(e.clone());
                }
                return;
            }
            if c.posted.is_empty() {
                return;
            }
            if c.avail().len() < PREFIX_LEN {
                if !c.fill() {
                    return;
                }
                continue;
            }
            let prefix = match wire::decode_prefix(c.avail()) {
                Ok(p) if p.kind == Kind::Msg => p,
                Ok(p) => {
                    c.broken = Some(Error::Protocol(format!(
                        "{:?} header on the control socket",
                        p.kind
                    )));
                    continue;
                }
                Err(e) => {
                    c.broken = Some(e);
                    continue;
                }
            };
            let total = MSG_LEN + prefix.payload_len as usize;
            if total > MSG_LEN + MAX_INLINE {
                c.broken = Some(Error::Protocol(format!(
                    "inline payload of {} bytes",
                    prefix.payload_len
                )));
                continue;
            }
            if c.avail().len() < total {
                if !c.fill() {
                    return;
                }
                continue;
            }
            match Msg::decode(c.avail()) {
                Ok(m) => {
                    if let Err(e) = self.deliver(c, m) {
                        c.broken = Some(e);
                        continue;
                    }
                    c.start += total;
                }
                Err(e) => c.broken = Some(e),
            }
        }
    }

    /// Places one message into the front receive (or discards it with an error).
    fn deliver(&self, c: &mut RecvCtrl, m: Msg) -> Result<()> {
        if m.seq != c.next_seq {
            return Err(Error::Protocol(format!(
                "message {} arrived, expected {}",
                m.seq, c.next_seq
            )));
        }
        let n = self.base.socks.len();
        if !m.is_inline() && (m.first_socket as usize >= n || m.chunk_size as u64 > MAX_CHUNK) {
            return Err(Error::Protocol(format!(
                "message {} names socket {} of {n} / chunk size {}",
                m.seq, m.first_socket, m.chunk_size
            )));
        }
        c.next_seq += 1;
        let payload_at = c.start + MSG_LEN;
        let Some(front) = c.posted.front_mut() else {
            return Err(Error::Protocol(
                "message delivered with no receive posted".into(),
            ));
        };
        let sub_i = front.subs.iter().position(|s| !s.matched && s.tag == m.tag);
        // Claim a buffer: the matching one, or (on a tag mismatch) any free one so the receive still ends.
        let claim = sub_i.or_else(|| front.subs.iter().position(|s| !s.matched));
        let Some(i) = claim else {
            return Err(Error::Protocol(
                "no free buffer in the front receive".into(),
            ));
        };
        front.subs[i].matched = true;
        front.unmatched -= 1;
        front.state.set_size(i, m.size);
        let sub = &front.subs[i];
        let state = front.state.clone();
        let region = if sub_i.is_none() {
            state.set_error(Error::TagMismatch(m.tag));
            None
        } else if m.size > sub.len {
            state.set_error(Error::Truncated {
                tag: m.tag,
                message: m.size,
                buffer: sub.len,
            });
            None
        } else {
            Some((sub.region.clone(), sub.offset))
        };
        if front.unmatched == 0 {
            c.posted.pop_front();
        }
        if m.is_inline() {
            if let Some((r, off)) = region {
                let len = m.size as usize;
                let dst = r.sink(off, len)?;
                // SAFETY: the sink is valid for `len` bytes and only this receive writes it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        c.buf[payload_at..payload_at + len].as_ptr(),
                        dst,
                        len,
                    )
                };
                r.landed(off, len)?;
            }
            state.piece_done();
            return Ok(());
        }
        let cs = m.chunk_size as u64;
        let plan: Vec<_> = Job::plan(m.size, cs, m.first_socket as usize, n).collect();
        state.add_pieces(plan.len());
        let (region, base) = match region {
            Some((r, off)) => (Some(r), off),
            None => (None, 0),
        };
        for (s, first) in plan {
            let sock = self.base.socks[s];
            self.base.net.workers[sock.worker].submit(Cmd::Recv {
                id: sock.id,
                job: Job {
                    req: state.clone(),
                    region: region.clone(),
                    base,
                    seq: m.seq,
                    size: m.size,
                    chunk_size: cs,
                    next_chunk: first,
                    stride: n as u64,
                    zc_last: None,
                },
            });
        }
        state.piece_done();
        Ok(())
    }
}

// ------------------------------------------------------------------ requests

enum Owner {
    Send(Arc<SendCore>),
    Recv(Arc<RecvCore>),
    None,
}

/// An operation in flight. Poll it with `test()` (never blocks) or `wait()`.
pub struct Request {
    state: Arc<ReqState>,
    owner: Owner,
    finished: Option<Result<Sizes>>,
}

impl Request {
    fn new(state: Arc<ReqState>, owner: Owner) -> Self {
        Request {
            state,
            owner,
            finished: None,
        }
    }

    /// `Ok(Some(sizes))` once done (bytes received per buffer, or sent);
    /// `Ok(None)` while in flight. Never blocks.
    pub fn test(&mut self) -> Result<Option<Sizes>> {
        if let Some(r) = &self.finished {
            return r.clone().map(Some);
        }
        let outcome = match &self.owner {
            Owner::Send(core) => {
                let mut c = lock(&core.ctrl);
                c.flush();
                if let Some(e) = self.state.error() {
                    Some(Err(e))
                } else if self.state.is_done() && c.flushed() {
                    Some(Ok(self.state.sizes()))
                } else if let Some(e) = c.broken.clone() {
                    Some(Err(e))
                } else if core.base.closed.load(Ordering::Acquire) {
                    Some(Err(Error::Closed))
                } else {
                    None
                }
            }
            Owner::Recv(core) => {
                let mut c = lock(&core.ctrl);
                core.progress(&mut c);
                drop(c);
                if let Some(e) = self.state.error() {
                    Some(Err(e))
                } else if self.state.is_done() {
                    Some(Ok(self.state.sizes()))
                } else if core.base.closed.load(Ordering::Acquire) {
                    Some(Err(Error::Closed))
                } else {
                    None
                }
            }
            Owner::None => Some(Ok(self.state.sizes())),
        };
        match outcome {
            None => Ok(None),
            Some(r) => {
                self.release();
                self.finished = Some(r.clone());
                r.map(Some)
            }
        }
    }

    /// Polls until done or `timeout` passes (`Error::Timeout`), sleeping
    /// between polls: the NIC workers progress the comm and wake us.
    pub fn wait(&mut self, timeout: Duration) -> Result<Sizes> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut spin = Spinning::new(&self.owner);
        loop {
            let seen = self.state.generation();
            if let Some(s) = self.test()? {
                return Ok(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: "waiting for a request".into(),
                    after_ms: timeout.as_millis() as u64,
                });
            }
            if now - start < SPIN {
                std::hint::spin_loop();
                continue;
            }
            spin.stop();
            // The slice bounds how long a send waits on a full control socket.
            self.state
                .wait_change(seen, (deadline - now).min(Duration::from_millis(1)));
        }
    }

    /// A handle to sleep on this request without holding it, so that
    /// another thread may poll it meanwhile; it wakes on any completion or
    /// error after it was taken.
    pub fn waiter(&self) -> Waiter {
        Waiter {
            seen: self.state.generation(),
            state: self.state.clone(),
        }
    }

    fn release(&mut self) {
        match std::mem::replace(&mut self.owner, Owner::None) {
            Owner::Send(c) => {
                c.base.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            Owner::Recv(c) => {
                c.base.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            Owner::None => {}
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("finished", &self.finished)
            .finish()
    }
}

/// Sleeps on a request's progress (see [`Request::waiter`]). The NIC
/// workers progress the comm meanwhile, as they do for a sleeping `wait`.
pub struct Waiter {
    state: Arc<ReqState>,
    seen: u64,
}

impl Waiter {
    /// Returns at the first completion or error since the waiter was taken
    /// (at once if one happened already), or after `timeout`.
    pub fn wait(&self, timeout: Duration) {
        self.state.wait_change(self.seen, timeout);
    }

    /// Whether the request moved since the waiter was taken, or is done or failed.
    fn ready(&self) -> bool {
        self.state.generation() != self.seen || self.state.is_done() || self.state.error().is_some()
    }
}

/// Marks a receive comm as polled by a spinning waiter for as long as it lives.
struct Spinning(Option<Arc<RecvCore>>);

impl Spinning {
    fn new(owner: &Owner) -> Self {
        match owner {
            Owner::Recv(c) => {
                c.spinners.fetch_add(1, Ordering::AcqRel);
                Spinning(Some(c.clone()))
            }
            _ => Spinning(None),
        }
    }

    fn stop(&mut self) {
        if let Some(c) = self.0.take() {
            c.spinners.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Spinning {
    fn drop(&mut self) {
        self.stop();
    }
}
