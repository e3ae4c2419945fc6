//! The progress engine: one worker thread per NIC moves chunks on that NIC's
//! data sockets. API calls hand work over a crossbeam channel; idle workers
//! sleep in epoll (an eventfd wakes them), they never spin.

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{ControlMessageOwned, MsgFlags};

use crate::config::ZeroCopy;
use crate::error::{Error, Result};
use crate::memory::{Region, RxPath, TxPath};
use crate::request::ReqState;
use crate::stats::Counters;
use crate::wire::{Chunk, CHUNK_LEN};
use crate::zerocopy::{self, Tracker};

/// The chunks of one message that travel on one data socket:
/// chunk indices `first, first + stride, …` below `ceil(size / chunk_size)`.
pub(crate) struct Job {
    pub req: Arc<ReqState>,
    /// `None` on receive: read and discard (a truncated or unmatched message).
    pub region: Option<Arc<Region>>,
    /// Offset of the message in the region.
    pub base: u64,
    pub seq: u64,
    pub size: u64,
    pub chunk_size: u64,
    pub next_chunk: u64,
    pub stride: u64,
    /// Id of the last MSG_ZEROCOPY send that carried this job's bytes.
    pub zc_last: Option<u32>,
}

impl Job {
    pub fn n_chunks(size: u64, chunk_size: u64) -> u64 {
        size.div_ceil(chunk_size)
    }

    /// The jobs of a message striped over `n_sockets`, as (socket index, first chunk).
    pub fn plan(
        size: u64,
        chunk_size: u64,
        first_socket: usize,
        n_sockets: usize,
    ) -> impl Iterator<Item = (usize, u64)> {
        let n_chunks = Self::n_chunks(size, chunk_size);
        (0..n_sockets).filter_map(move |s| {
            let k0 = ((s + n_sockets - first_socket) % n_sockets) as u64;
            (k0 < n_chunks).then_some((s, k0))
        })
    }

    /// Lets go of the memory, then reports: a finished request must not still hold its region.
    fn finish(self, err: Option<Error>) {
        let Job { req, region, .. } = self;
        drop(region);
        match err {
            None => req.piece_done(),
            Some(e) => req.fail(e),
        }
    }

    fn chunk(&self) -> (u64, usize) {
        let off = self.next_chunk * self.chunk_size;
        (off, (self.size - off).min(self.chunk_size) as usize)
    }

    /// Moves to the next chunk; true when the job has no more.
    fn advance(&mut self) -> bool {
        self.next_chunk += self.stride;
        self.next_chunk * self.chunk_size >= self.size
    }
}

/// A control socket the worker watches for its owner, so that a comm
/// progresses even while its caller waits on the other end.
pub(crate) trait Poke: Send + Sync {
    fn poke(&self);
}

/// How a data socket sends payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TxMode {
    pub zerocopy: ZeroCopy,
    /// Smallest payload sent with MSG_ZEROCOPY.
    pub min_zcopy: usize,
}

pub(crate) enum Cmd {
    Add {
        id: u64,
        stream: TcpStream,
        tx: TxMode,
    },
    /// Calls `target.poke()` whenever `fd` turns readable (`out = false`) or writable.
    Watch {
        id: u64,
        fd: OwnedFd,
        out: bool,
        target: Weak<dyn Poke>,
    },
    Send {
        id: u64,
        job: Job,
    },
    Recv {
        id: u64,
        job: Job,
    },
    Close {
        id: u64,
    },
    Shutdown,
}

const WAKE_ID: u64 = u64::MAX;
/// Largest piece of a discarded chunk read at once.
const SCRATCH_LEN: usize = 1 << 20;

pub(crate) struct Worker {
    tx: Sender<Cmd>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(name: String, counters: Arc<Counters>) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| Error::io("eventfd", e.into()))?,
        );
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::io("epoll_create", e.into()))?;
        epoll
            .add(wake.as_ref(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_ID))
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        let sleeping = Arc::new(AtomicBool::new(false));
        let mut state = WorkerLoop {
            rx,
            wake: wake.clone(),
            sleeping: sleeping.clone(),
            epoll,
            socks: HashMap::new(),
            counters,
            watches: HashMap::new(),
            scratch: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || state.run())
            .map_err(|e| Error::io("spawn worker", e))?;
        Ok(Worker {
            tx,
            wake,
            sleeping,
            thread: Some(thread),
        })
    }

    pub fn submit(&self, cmd: Cmd) {
        // The channel outlives the thread only after Drop, so a send cannot fail before then.
        let _ = self.tx.send(cmd);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = self.wake.write(1);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Shutdown);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Progress of the chunk in flight in one direction of a socket.
#[derive(Default)]
struct Cursor {
    active: bool,
    hdr: [u8; CHUNK_LEN],
    hdr_done: usize,
    body_done: usize,
}

/// Zero-copy state of a data socket.
struct Zc {
    /// False once the kernel reported copying in `auto` mode (or SO_ZEROCOPY failed).
    enabled: bool,
    mode: ZeroCopy,
    min: usize,
    tracker: Tracker,
    /// Jobs fully sent whose last zero-copy send is not yet acknowledged.
    awaiting: VecDeque<Job>,
    /// The error queue has notifications to read.
    errq: bool,
}

struct Sock {
    stream: TcpStream,
    sends: VecDeque<Job>,
    recvs: VecDeque<Job>,
    tx: Cursor,
    rx: Cursor,
    readable: bool,
    writable: bool,
    dead: Option<Error>,
    zc: Zc,
}

/// The process logs the kernel's copying of zero-copy sends once.
static COPY_LOGGED: AtomicBool = AtomicBool::new(false);

impl Sock {
    fn fail(&mut self, e: Error) {
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

    /// Sends until the socket would block or has nothing to send. True if bytes moved.
    fn progress_tx(&mut self, counters: &Counters) -> bool {
        let mut moved = false;
        while self.writable && self.dead.is_none() {
            let Some(job) = self.sends.front_mut() else {
                break;
            };
            let (off, len) = job.chunk();
            if !self.tx.active {
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
                    let e = e.clone();
                    self.fail(e);
                    break;
                }
                None => {
                    self.fail(Error::InvalidArgument("send job without memory".into()));
                    break;
                }
            };
            // SAFETY: src is valid for len bytes while the job holds its region (TxPath contract).
            let body = unsafe { host_slice(src, len) };
            let hdr_left = CHUNK_LEN - self.tx.hdr_done;
            let zerocopy = self.zc.enabled && len >= self.zc.min && hdr_left == 0;
            // With MSG_ZEROCOPY the kernel reads the iovecs after sendmsg returns, so the
            // header (which the next chunk overwrites) goes first in a copying send of its own.
            let iov_all = [
                IoSlice::new(&self.tx.hdr[self.tx.hdr_done..]),
                IoSlice::new(&body[self.tx.body_done..]),
            ];
            let iov: &[IoSlice] = if self.zc.enabled && len >= self.zc.min && hdr_left > 0 {
                &iov_all[..1]
            } else {
                &iov_all
            };
            let plain = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            let fd = self.stream.as_raw_fd();
            let mut sent = if zerocopy {
                match nix::sys::socket::sendmsg::<()>(
                    fd,
                    iov,
                    &[],
                    plain | MsgFlags::from_bits_retain(libc::MSG_ZEROCOPY),
                    None,
                ) {
                    Ok(n) => {
                        job.zc_last = Some(self.zc.tracker.sent());
                        Counters::bump(&counters.zc_sends, 1);
                        Ok(n)
                    }
                    // optmem exhausted: this send copies, the request still succeeds.
                    Err(Errno::ENOBUFS) => {
                        Counters::bump(&counters.zc_enobufs, 1);
                        nix::sys::socket::sendmsg::<()>(fd, iov, &[], plain, None)
                    }
                    Err(e) => Err(e),
                }
            } else {
                nix::sys::socket::sendmsg::<()>(fd, iov, &[], plain, None)
            };
            if let Err(Errno::EINTR) = sent {
                sent = Ok(0);
            }
            match sent {
                Ok(n) => {
                    moved |= n > 0;
                    let h = n.min(hdr_left);
                    self.tx.hdr_done += h;
                    self.tx.body_done += n - h;
                    if self.tx.hdr_done == CHUNK_LEN && self.tx.body_done == len {
                        self.tx.active = false;
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
                Err(Errno::EAGAIN) => self.writable = false,
                Err(e) => self.fail(Error::io("send", e.into())),
            }
        }
        moved
    }

    /// Reads zero-copy completions and releases the jobs they cover. True if any finished.
    fn progress_zc(&mut self, counters: &Counters) -> bool {
        if !self.zc.errq || self.dead.is_some() {
            return false;
        }
        self.zc.errq = false;
        let fd = self.stream.as_raw_fd();
        loop {
            let mut cbuf = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
            let mut dummy = [0u8; 1];
            let mut iov = [IoSliceMut::new(&mut dummy)];
            let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
            let msg = match nix::sys::socket::recvmsg::<()>(fd, &mut iov, Some(&mut cbuf), flags) {
                Ok(m) => m,
                Err(Errno::EINTR) => continue,
                Err(_) => break, // EAGAIN: drained
            };
            let Ok(cmsgs) = msg.cmsgs() else { break };
            for c in cmsgs {
                let ee = match c {
                    ControlMessageOwned::Ipv4RecvErr(ee, _)
                    | ControlMessageOwned::Ipv6RecvErr(ee, _) => ee,
                    _ => continue,
                };
                let Some(done) = zerocopy::completion(&ee) else {
                    continue;
                };
                self.zc.tracker.complete(done);
                let n = done.hi.wrapping_sub(done.lo).wrapping_add(1) as u64;
                Counters::bump(
                    if done.copied {
                        &counters.zc_copied
                    } else {
                        &counters.zc_acked
                    },
                    n,
                );
                if done.copied && self.zc.mode == ZeroCopy::Auto && self.zc.enabled {
                    // As msg_zerocopy.rst advises: the kernel copies anyway (loopback, or a NIC
                    // without scatter-gather/checksum offload), so stop paying for notifications.
                    self.zc.enabled = false;
                    Counters::bump(&counters.zc_switched_off, 1);
                    let peer = self
                        .stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    if !COPY_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::info!(%peer, "the kernel copies MSG_ZEROCOPY sends on this path; these sockets use plain sends (logged once)");
                    } else {
                        tracing::debug!(%peer, "zero-copy sends copied; plain sends from now on");
                    }
                }
            }
        }
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

    /// Receives until the socket would block or no receive is posted. True if bytes moved.
    fn progress_rx(&mut self, scratch: &mut Vec<u8>) -> bool {
        let mut moved = false;
        while self.readable && self.dead.is_none() {
            let Some(job) = self.recvs.front_mut() else {
                break;
            };
            let (off, len) = job.chunk();
            if !self.rx.active {
                self.rx = Cursor {
                    active: true,
                    ..Cursor::default()
                };
            }
            let want = len - self.rx.body_done;
            let body: &mut [u8] = match job.region.as_ref() {
                Some(r) => match r.sink(job.base + off + self.rx.body_done as u64, want) {
                    // SAFETY: the sink is valid for `want` bytes while the job holds its region (RxPath contract).
                    Ok(p) => unsafe { host_slice_mut(p, want) },
                    Err(e) => {
                        self.fail(e);
                        break;
                    }
                },
                None => {
                    if scratch.is_empty() {
                        scratch.resize(SCRATCH_LEN, 0);
                    }
                    let n = want.min(scratch.len());
                    &mut scratch[..n]
                }
            };
            let hdr_done = self.rx.hdr_done;
            let mut iov = [
                IoSliceMut::new(&mut self.rx.hdr[hdr_done..]),
                IoSliceMut::new(body),
            ];
            match nix::sys::uio::readv(&self.stream, &mut iov) {
                Ok(0) => self.fail(Error::ConnectionLost("peer closed a data socket".into())),
                Ok(n) => {
                    moved = true;
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
                                self.fail(Error::Protocol(format!(
                                    "got chunk {c:?}, expected {expected:?}"
                                )));
                                break;
                            }
                            Err(e) => {
                                self.fail(e);
                                break;
                            }
                        }
                    }
                    if self.rx.hdr_done == CHUNK_LEN && self.rx.body_done == len {
                        self.rx.active = false;
                        if let Some(r) = job.region.as_ref() {
                            if let Err(e) = r.landed(job.base + off, len) {
                                self.fail(e);
                                break;
                            }
                        }
                        if job.advance() {
                            if let Some(done) = self.recvs.pop_front() {
                                done.finish(None);
                            }
                        }
                    }
                }
                Err(Errno::EAGAIN) => self.readable = false,
                Err(Errno::EINTR) => {}
                Err(e) => self.fail(Error::io("recv", e.into())),
            }
        }
        moved
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

/// # Safety
/// `p` must be valid for reads of `len` bytes for the returned lifetime.
unsafe fn host_slice<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if len == 0 {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(p, len) }
}

/// # Safety
/// `p` must be valid for writes of `len` bytes, and not otherwise accessed, for the returned lifetime.
unsafe fn host_slice_mut<'a>(p: *mut u8, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

struct WorkerLoop {
    rx: Receiver<Cmd>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    epoll: Epoll,
    socks: HashMap<u64, Sock>,
    counters: Arc<Counters>,
    watches: HashMap<u64, (OwnedFd, Weak<dyn Poke>)>,
    scratch: Vec<u8>,
}

impl WorkerLoop {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            while let Ok(cmd) = self.rx.try_recv() {
                if !self.handle(cmd) {
                    return;
                }
            }
            let mut moved = false;
            for s in self.socks.values_mut() {
                moved |= s.progress_zc(&self.counters);
                moved |= s.progress_tx(&self.counters);
                moved |= s.progress_rx(&mut self.scratch);
            }
            if moved {
                continue;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            if !self.rx.is_empty() {
                self.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            // The timeout is a safety net only; the eventfd and socket edges wake us.
            let n = self
                .epoll
                .wait(&mut events, EpollTimeout::from(1000u16))
                .unwrap_or(0);
            self.sleeping.store(false, Ordering::SeqCst);
            for ev in &events[..n] {
                if ev.data() == WAKE_ID {
                    let _ = self.wake.read();
                    continue;
                }
                if let Some((_, target)) = self.watches.get(&ev.data()) {
                    if let Some(t) = target.upgrade() {
                        t.poke();
                    }
                    continue;
                }
                if let Some(s) = self.socks.get_mut(&ev.data()) {
                    let f = ev.events();
                    if f.intersects(
                        EpollFlags::EPOLLIN
                            | EpollFlags::EPOLLRDHUP
                            | EpollFlags::EPOLLHUP
                            | EpollFlags::EPOLLERR,
                    ) {
                        s.readable = true;
                    }
                    if f.intersects(
                        EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                    ) {
                        s.writable = true;
                    }
                    if f.contains(EpollFlags::EPOLLERR) {
                        s.zc.errq = true;
                    }
                }
            }
        }
    }

    /// False when the worker must exit.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Add { id, stream, tx } => {
                let zc_on = tx.zerocopy != ZeroCopy::Off && enable_zerocopy(&stream);
                let flags = EpollFlags::EPOLLIN
                    | EpollFlags::EPOLLOUT
                    | EpollFlags::EPOLLRDHUP
                    | EpollFlags::EPOLLET;
                let dead = self
                    .epoll
                    .add(&stream, EpollEvent::new(flags, id))
                    .err()
                    .map(|e| Error::io("epoll_ctl", e.into()));
                self.socks.insert(
                    id,
                    Sock {
                        stream,
                        sends: VecDeque::new(),
                        recvs: VecDeque::new(),
                        tx: Cursor::default(),
                        rx: Cursor::default(),
                        readable: true,
                        writable: true,
                        dead,
                        zc: Zc {
                            enabled: zc_on,
                            mode: tx.zerocopy,
                            min: tx.min_zcopy,
                            tracker: Tracker::default(),
                            awaiting: VecDeque::new(),
                            errq: false,
                        },
                    },
                );
            }
            Cmd::Watch {
                id,
                fd,
                out,
                target,
            } => {
                let dir = if out {
                    EpollFlags::EPOLLOUT
                } else {
                    EpollFlags::EPOLLIN
                };
                let flags = dir | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
                if self.epoll.add(&fd, EpollEvent::new(flags, id)).is_ok() {
                    self.watches.insert(id, (fd, target));
                }
            }
            Cmd::Send { id, job } | Cmd::Recv { id, job } if !self.socks.contains_key(&id) => {
                job.finish(Some(Error::Closed));
            }
            Cmd::Send { id, job } => self.enqueue(id, job, true),
            Cmd::Recv { id, job } => self.enqueue(id, job, false),
            Cmd::Close { id } => {
                if let Some((fd, _)) = self.watches.remove(&id) {
                    let _ = self.epoll.delete(&fd);
                }
                if let Some(mut s) = self.socks.remove(&id) {
                    let _ = self.epoll.delete(&s.stream);
                    let _ = s.stream.shutdown(std::net::Shutdown::Both);
                    s.fail(Error::Closed);
                }
            }
            Cmd::Shutdown => {
                for (_, mut s) in self.socks.drain() {
                    s.fail(Error::Closed);
                }
                return false;
            }
        }
        true
    }

    fn enqueue(&mut self, id: u64, job: Job, send: bool) {
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        if let Some(e) = &s.dead {
            job.finish(Some(e.clone()));
        } else if send {
            s.sends.push_back(job);
        } else {
            s.recvs.push_back(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_covers_every_chunk_once() {
        for (size, cs, first, n) in [
            (10u64, 3u64, 2usize, 4usize),
            (1, 4096, 0, 3),
            (4096 * 7, 4096, 5, 6),
            (5, 8, 1, 2),
        ] {
            let mut seen = vec![0; Job::n_chunks(size, cs) as usize];
            for (s, k0) in Job::plan(size, cs, first, n) {
                let mut k = k0;
                while k * cs < size {
                    assert_eq!((first + k as usize) % n, s);
                    seen[k as usize] += 1;
                    k += n as u64;
                }
            }
            assert!(
                seen.iter().all(|&c| c == 1),
                "{size} {cs} {first} {n}: {seen:?}"
            );
        }
    }
}
