//! Send and receive comms, and the requests they hand out.
//!
//! Each comm owns its sockets and one lock over its control stream and
//! the sans-I/O protocol state (`crate::ctrl`) that it drives. Several
//! threads take turns at that lock: callers (`isend`, `irecv`, `test`,
//! `wait`), the worker that watches the control socket (pokes, ticks), and
//! data workers with news (a chunk that waits for its announcement, a
//! message in place, a failed socket). Those never block on it: they leave
//! a note (`Ctrl::nudge`) and whoever holds the lock runs the protocol
//! again before it lets go.

mod recv;
mod redial;
mod request;
mod send;

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use crate::engine::{Cmd, CommLink, SockId, Watch};
use crate::error::{Error, Result};
use crate::memory::MemoryRegion;
use crate::net::NetInner;
use crate::request::FdWaker;
use crate::stats::{SockCounters, SocketStats};

pub(crate) use recv::RecvCore;
pub use recv::{RecvBuf, RecvComm};
pub use request::{Request, Waiter};
pub use send::SendComm;
pub(crate) use send::SendCore;

/// A data socket of a comm: which worker owns it, and its id there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataSock {
    pub worker: usize,
    pub id: u64,
}

/// A comm's data socket by its index in the handshake: the socket now
/// in that place (a reconnect puts a new one, of the next generation).
pub(crate) struct Slot {
    pub sock: DataSock,
    pub nic: usize,
    pub gen: u32,
    /// In use: not retired (or connected again since).
    pub live: bool,
    pub counters: Arc<SockCounters>,
}

/// What the handshake settled for a new comm.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Agreed {
    /// The peer's peer timeout: our heartbeats must keep it content.
    pub peer_timeout: Option<Duration>,
    /// The sender's inline threshold (what the receiver must expect).
    pub inline_threshold: usize,
    /// The largest inline message of the comm: the receiver accepts it,
    /// the sender sends a lone message up to it inline.
    pub inline_max: usize,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Items data workers hand to a comm's protocol thread. Taking from an
/// empty one costs one atomic load, not a lock: the protocol looks on
/// every progress, and there is rarely anything.
pub(crate) struct Mailbox<T> {
    items: Mutex<Vec<T>>,
    /// Set after each push; cleared by the taker before it takes.
    posted: AtomicBool,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox {
            items: Mutex::new(Vec::new()),
            posted: AtomicBool::new(false),
        }
    }
}

impl<T> Mailbox<T> {
    pub fn push(&self, t: T) {
        lock(&self.items).push(t);
        self.posted.store(true, Ordering::Release);
    }

    /// Everything pushed so far (a push racing with the take is seen by
    /// this take or flags the next one).
    pub fn take(&self) -> Vec<T> {
        if !self.posted.load(Ordering::Acquire) || !self.posted.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&self.items))
    }
}

/// The control stream's lock and the note that someone has news for it.
struct Ctrl<T> {
    state: Mutex<T>,
    dirty: AtomicBool,
}

impl<T> Ctrl<T> {
    fn new(t: T) -> Self {
        Ctrl {
            state: Mutex::new(t),
            dirty: AtomicBool::new(false),
        }
    }

    /// Runs `f` under the lock, then `progress` for any news that came
    /// meanwhile (from threads that did not wait for the lock).
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R, progress: impl Fn(&mut T)) -> R {
        let r = f(&mut lock(&self.state));
        self.settle_news(&progress);
        r
    }

    /// Runs `f` if the lock is free (a worker's tick: whoever holds it is
    /// driving the comm already), then `progress` for any news.
    fn try_with(&self, f: impl FnOnce(&mut T), progress: impl Fn(&mut T)) {
        if let Some(mut g) = try_lock(&self.state) {
            f(&mut g);
        }
        self.settle_news(&progress);
    }

    /// Has `progress` run soon: now if the lock is free, else by its holder.
    fn nudge(&self, progress: impl Fn(&mut T)) {
        self.dirty.store(true, Ordering::SeqCst);
        self.settle_news(&progress);
    }

    fn settle_news(&self, progress: &impl Fn(&mut T)) {
        // A nudger sets `dirty` before it tries the lock, the holder looks at
        // `dirty` after it lets go: one of the two sees the other.
        while self.dirty.load(Ordering::SeqCst) {
            let Some(mut g) = try_lock(&self.state) else {
                return;
            };
            self.dirty.store(false, Ordering::SeqCst);
            progress(&mut g);
        }
    }
}

/// What send and receive comms share: their sockets and slot accounting.
struct CommBase {
    net: Arc<NetInner>,
    slots: Mutex<Vec<Slot>>,
    /// Slots, fixed at the handshake.
    n_data: usize,
    /// Slots in use, kept with their `live` flags (under the slots' lock)
    /// and read without it.
    live: AtomicUsize,
    inflight: AtomicUsize,
    closed: AtomicBool,
    /// The data sockets were told to close (once).
    socks_closed: AtomicBool,
    /// The worker's watch on the control socket, and what it is armed for.
    watch: Watch,
    armed: AtomicU8,
    /// When the protocol's timers next need a tick (µs since `EPOCH`; 0: now).
    due_us: AtomicU64,
    /// The control socket (owned by the comm's `Ctrl`), for sleepers to poll.
    ctrl_fd: i32,
    /// Wakes the comm's sleepers when a request moves.
    waker: Arc<FdWaker>,
}

/// A peer that closes its comm or dies ends its control and data sockets
/// within moments of each other, in no set order. A data socket the peer
/// ended is judged only once the control socket had this long to say
/// whether the peer is gone (its Bye, or its end): then the socket's end
/// is the peer's, no path's failure. And once it is gone, its other data
/// sockets have this long to end after the first (their bytes all came).
const PEER_END_GRACE: Duration = Duration::from_millis(200);

/// The clock of `CommBase::due_us`.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn micros(t: Instant) -> u64 {
    t.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_micros() as u64
}

const ARM_READ: u8 = 1;
const ARM_WRITE: u8 = 2;

impl CommBase {
    /// A comm over `data` (NIC, stream), in index order, whose sockets
    /// talk to `link`.
    fn new(
        net: Arc<NetInner>,
        data: Vec<(usize, TcpStream)>,
        link: &Arc<dyn CommLink>,
        receives: bool,
        watch: Watch,
        ctrl: &TcpStream,
    ) -> Self {
        let slots: Vec<Slot> = data
            .into_iter()
            .enumerate()
            .map(|(i, (nic, s))| open_slot(&net, nic, s, link, receives, i, 0))
            .collect();
        CommBase {
            n_data: slots.len(),
            live: AtomicUsize::new(slots.len()),
            ctrl_fd: ctrl.as_raw_fd(),
            waker: Arc::new(FdWaker::default()),
            net,
            slots: Mutex::new(slots),
            inflight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            socks_closed: AtomicBool::new(false),
            watch,
            armed: AtomicU8::new(0),
            due_us: AtomicU64::new(0),
        }
    }

    /// Records when the timers next need the comm.
    fn set_due(&self, due: Option<Instant>) {
        self.due_us
            .store(due.map_or(u64::MAX, micros), Ordering::Release);
    }

    /// Whether a tick has work: a heartbeat or check is due.
    fn tick_due(&self) -> bool {
        micros(Instant::now()) >= self.due_us.load(Ordering::Acquire)
    }

    fn close_data(&self) {
        if !self.socks_closed.swap(true, Ordering::AcqRel) {
            for s in lock(&self.slots).iter().filter(|s| s.live) {
                self.net.workers[s.sock.worker].submit(Cmd::Close { id: s.sock.id });
            }
        }
    }

    /// Has the workers of this comm's sockets look at them again.
    fn kick(&self) {
        let slots = lock(&self.slots);
        let mut seen = Vec::with_capacity(slots.len());
        for s in slots.iter().filter(|s| s.live) {
            if !seen.contains(&s.sock.worker) {
                seen.push(s.sock.worker);
                self.net.workers[s.sock.worker].submit(Cmd::Kick);
            }
        }
    }

    /// Has the workers of sockets `which` look at them again.
    fn kick_slots(&self, which: &[usize]) {
        let slots = lock(&self.slots);
        let mut seen = Vec::with_capacity(which.len());
        for s in which
            .iter()
            .filter_map(|&i| slots.get(i))
            .filter(|s| s.live)
        {
            if !seen.contains(&s.sock.worker) {
                seen.push(s.sock.worker);
                self.net.workers[s.sock.worker].submit(Cmd::Kick);
            }
        }
    }

    /// Takes data socket `index` of `gen` out and closes it; its NIC, if
    /// it was in use.
    fn retire(&self, index: usize, gen: u32) -> Option<usize> {
        let mut slots = lock(&self.slots);
        let s = slots.get_mut(index).filter(|s| s.live && s.gen == gen)?;
        s.live = false;
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.net.workers[s.sock.worker].submit(Cmd::Close { id: s.sock.id });
        Some(s.nic)
    }

    /// The NIC and generation of socket `index`.
    fn slot_state(&self, index: usize) -> Option<(usize, u32)> {
        lock(&self.slots).get(index).map(|s| (s.nic, s.gen))
    }

    fn is_live(&self, index: usize) -> bool {
        lock(&self.slots).get(index).is_some_and(|s| s.live)
    }

    /// Puts a connection made again in place `index` as generation `gen`
    /// (not when the comm closes, or the place is taken already).
    fn revive(
        &self,
        index: usize,
        stream: TcpStream,
        link: &Arc<dyn CommLink>,
        receives: bool,
        gen: u32,
    ) -> bool {
        if self.closed.load(Ordering::Acquire) || self.socks_closed.load(Ordering::Acquire) {
            return false;
        }
        if let Err(e) = self.net.tune(&stream, true) {
            tracing::debug!(
                socket = index,
                "reconnected socket refused its options: {e}"
            );
            return false;
        }
        let mut slots = lock(&self.slots);
        let Some(s) = slots.get_mut(index).filter(|s| !s.live && gen > s.gen) else {
            return false;
        };
        let id = SockId {
            index: index as u16,
            gen,
        };
        s.sock = self.net.add_data_socket(
            s.nic,
            stream,
            link.clone(),
            receives,
            id,
            s.counters.clone(),
        );
        s.gen = gen;
        s.live = true;
        self.live.fetch_add(1, Ordering::AcqRel);
        s.counters.reconnected();
        true
    }

    /// (index, generation) of the data sockets in use.
    fn live_ids(&self) -> Vec<(usize, u32)> {
        lock(&self.slots)
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live)
            .map(|(i, s)| (i, s.gen))
            .collect()
    }

    /// Data sockets in use.
    fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    fn n_data(&self) -> usize {
        self.n_data
    }

    fn stats(&self) -> Vec<SocketStats> {
        lock(&self.slots)
            .iter()
            .enumerate()
            .map(|(index, s)| SocketStats {
                index,
                nic: s.nic,
                live: s.live,
                generation: s.gen,
                counts: s.counters.snapshot(),
            })
            .collect()
    }

    /// Arms the control-socket watch for what the comm awaits (one-shot:
    /// the worker's poke disarms it, see `poked`).
    fn arm(&self, read: bool, write: bool) {
        let want = if read { ARM_READ } else { 0 } | if write { ARM_WRITE } else { 0 };
        if want == 0 {
            return;
        }
        let had = self.armed.fetch_or(want, Ordering::AcqRel);
        if had | want != had {
            let now = had | want;
            self.watch.arm(now & ARM_READ != 0, now & ARM_WRITE != 0);
        }
    }

    /// The watch fired and disarmed itself.
    fn poked(&self) {
        self.armed.store(0, Ordering::Release);
    }

    /// The fd a sleeping waiter polls, while the comm can still move.
    fn poll_fd(&self) -> Option<i32> {
        (!self.socks_closed.load(Ordering::Acquire)).then_some(self.ctrl_fd)
    }

    /// A finished or dropped request frees its slot.
    fn release_slot(&self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }
}

/// Hands data socket `index` (of generation `gen`) to a worker of its NIC.
fn open_slot(
    net: &NetInner,
    nic: usize,
    stream: TcpStream,
    link: &Arc<dyn CommLink>,
    receives: bool,
    index: usize,
    gen: u32,
) -> Slot {
    let counters = net.sock_counters(nic);
    let id = SockId {
        index: index as u16,
        gen,
    };
    let sock = net.add_data_socket(nic, stream, link.clone(), receives, id, counters.clone());
    Slot {
        sock,
        nic,
        gen,
        live: true,
        counters,
    }
}

/// What one read of the control socket got.
struct CtrlRead {
    /// Bytes read (0: the peer closed its side).
    n: usize,
    /// The read filled its space, so more may be waiting. A short read has
    /// drained the socket, most likely: what comes later wakes the watch
    /// or the next poll, and a read that finds nothing only costs a
    /// system call (on the way to the caller's next send).
    more: bool,
}

/// A comm's control socket. Reads peek, and the bytes are dropped later.
/// Linux acknowledges what a read drains at once (a bare ACK, on a
/// connection that carries nothing back: a comm's control connection,
/// mostly), and on loopback that ACK's trip through the stack runs inside
/// the `recv` that drops the bytes, and on the peer's socket. Dropped at
/// the next read, the ACK leaves after the answer, but it meets the peer's
/// next send on that socket's lock whenever the answer takes a few hundred
/// nanoseconds of work. On a receive comm's socket, where the kernel keeps
/// a peek offset (SO_PEEK_OFF; TCP has it since Linux 6.9), they are
/// dropped a few reads at a time, so most messages meet no ACK: 64 B one
/// way 2.9-3.1 µs against 3.4 at the next read, raw TCP on one connection
/// 2.7 (PERFORMANCE.md). Elsewhere a peek would return the owed bytes
/// again: they go at the next read. Owed bytes go before anyone sleeps on
/// the socket (`settle`), which reads ready while they are there.
pub(crate) struct CtrlSocket {
    stream: TcpStream,
    /// Bytes peeked (and handed to the protocol) but still in the socket.
    owed: usize,
    /// Reads that found bytes since the owed ones were last dropped.
    reads: usize,
    /// Owed bytes go in batches (a receive comm's socket, where the kernel
    /// keeps a peek offset); else at the next read.
    batched: bool,
}

/// Where the kernel keeps a peek offset, a read drops the owed bytes first
/// once this many are held, or once `DROP_READS` reads found some: each
/// unacknowledged segment holds the peer's congestion window, and 11 of
/// 48 bytes held until the peer's delayed ACK stalled a ping-pong for
/// 500 µs at the 99th percentile (2 KiB of 104 B ones too; PERFORMANCE.md).
const DROP_AT: usize = 512;
const DROP_READS: usize = 4;

impl CtrlSocket {
    /// `batch`: drop in batches where the kernel can (a receive comm's
    /// socket, which small messages arrive on; a send comm reads posts
    /// and acknowledgements, and drops at the next read).
    pub(crate) fn new(stream: TcpStream, batch: bool) -> Self {
        let batched = batch && peek_offset(&stream);
        Self::reading(stream, batched)
    }

    /// `batched`: drop in batches (needs the kernel's peek offset).
    fn reading(stream: TcpStream, batched: bool) -> Self {
        CtrlSocket {
            stream,
            owed: 0,
            reads: 0,
            batched,
        }
    }

    /// Reads what the socket has beyond the bytes read already into
    /// `space` (non-blocking); `None` when nothing new is there. `space`
    /// must not be empty.
    fn read(&mut self, space: &mut [u8]) -> Result<Option<CtrlRead>> {
        if self.owed > 0 && (!self.batched || self.owed >= DROP_AT || self.reads >= DROP_READS) {
            self.drop_owed(space)?;
        }
        let fd = self.stream.as_raw_fd();
        loop {
            match nix::sys::socket::recv(fd, space, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    self.owed += n;
                    self.reads += 1;
                    return Ok(Some(CtrlRead {
                        n,
                        more: n > 0 && n == space.len(),
                    }));
                }
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(ctrl_error("recv control", e)),
            }
        }
    }

    /// Drops the bytes read already, so that the socket reads ready only
    /// for new ones: before anyone sleeps on it. `room` as in `drop_owed`
    /// (the inbox space: one call drops what one read showed). An error is
    /// left for the next read to report.
    fn settle(&mut self, room: &mut [u8]) {
        let _ = self.drop_owed(room);
    }

    /// Drops the peeked bytes; `buf` is room the kernel is given and does
    /// not write to (MSG_TRUNC on TCP discards without copying).
    fn drop_owed(&mut self, buf: &mut [u8]) -> Result<()> {
        let fd = self.stream.as_raw_fd();
        while self.owed > 0 {
            let len = self.owed.min(buf.len());
            match nix::sys::socket::recv(
                fd,
                &mut buf[..len],
                MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) if n > 0 => {
                    self.owed -= n.min(self.owed);
                    self.reads = 0;
                }
                Ok(_) | Err(Errno::EAGAIN) => {
                    return Err(Error::Protocol(
                        "control socket lost bytes it had shown".into(),
                    ))
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(ctrl_error("recv control", e)),
            }
        }
        Ok(())
    }

    /// Writes what it can of `out` (non-blocking); the bytes taken.
    fn write(&self, out: &[u8]) -> Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        loop {
            match nix::sys::socket::send(self.stream.as_raw_fd(), out, flags) {
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN) => return Ok(0),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(ctrl_error("send control", e)),
            }
        }
    }

    /// Closes the socket without losing what was written: the peer gets
    /// our queued bytes and a FIN. Unread input at close would make the
    /// kernel reset the connection and drop unsent bytes, so input is read
    /// and dropped until the peer acknowledged everything (briefly; a dead
    /// peer costs `patience`).
    fn close(&self, patience: Duration) {
        let stream = &self.stream;
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + patience;
        let mut sink = [0u8; 4096];
        loop {
            let eof = loop {
                match nix::sys::socket::recv(stream.as_raw_fd(), &mut sink, MsgFlags::MSG_DONTWAIT)
                {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(Errno::EINTR) => {}
                    Err(_) => break false,
                }
            };
            if eof || crate::engine::outq(stream) == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Has the kernel keep a peek offset on `s` (SO_PEEK_OFF): a peek then
/// returns only bytes not peeked yet, and the end of the stream or an
/// error behind bytes still owed. False where it is refused (TCP before
/// Linux 6.9).
fn peek_offset(s: &TcpStream) -> bool {
    const SO_PEEK_OFF: libc::c_int = 42;
    crate::engine::set_int_option(s, libc::SOL_SOCKET, SO_PEEK_OFF, 0).is_ok()
}

fn ctrl_error(op: &'static str, e: Errno) -> Error {
    Error::io(op, std::io::Error::from(e))
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::Write;
    use std::net::TcpListener;

    /// A connected pair: the plain writing end, and the reading end read
    /// with the kernel's peek offset (`offset`) or without.
    fn pair(offset: bool) -> (TcpStream, CtrlSocket) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        if offset {
            assert!(peek_offset(&rx), "this kernel keeps no TCP peek offset");
            (tx, CtrlSocket::reading(rx, true))
        } else {
            (tx, CtrlSocket::reading(rx, false))
        }
    }

    /// Both ways of reading where this kernel has both.
    fn modes() -> Vec<bool> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        if peek_offset(&s) {
            vec![true, false]
        } else {
            vec![false]
        }
    }

    /// Whether a poll on the socket (as a sleeper's) reports it readable.
    fn readable(s: &CtrlSocket) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(s.stream.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() > 0
    }

    /// Reads until something new comes (or fails the test after 5 s).
    fn next(rx: &mut CtrlSocket, space: &mut [u8]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = rx.read(space).unwrap() {
                return r.n;
            }
            assert!(Instant::now() < deadline, "nothing came");
        }
    }

    /// Every byte is handed out exactly once, in order, whatever the
    /// read sizes, though each read only peeks and bytes are dropped late.
    #[test]
    fn peeked_reads_hand_out_each_byte_once() {
        for offset in modes() {
            let (mut tx, mut rx) = pair(offset);
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let sent: Vec<u8> = (0..200_003).map(|_| rng.gen()).collect();
            let writer = {
                let sent = sent.clone();
                std::thread::spawn(move || {
                    for frame in sent.chunks(37) {
                        tx.write_all(frame).unwrap();
                    }
                    tx
                })
            };
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while got.len() < sent.len() {
                assert!(Instant::now() < deadline, "stalled at {}", got.len());
                let mut space = vec![0u8; rng.gen_range(1..5000)];
                match rx.read(&mut space).unwrap() {
                    Some(CtrlRead { n, .. }) => got.extend_from_slice(&space[..n]),
                    None => std::thread::yield_now(),
                }
                if rng.gen_bool(0.1) {
                    rx.settle(&mut [0u8; 4096]);
                }
            }
            let _tx = writer.join().unwrap();
            assert_eq!(got, sent, "peek offset {offset}");
            assert!(rx.read(&mut [0u8; 64]).unwrap().is_none());
        }
    }

    /// With a peek offset small messages stay in the socket for
    /// `DROP_READS` reads (their ACK then leaves); without one they go at
    /// the next read. After settle the socket reads ready only for new
    /// bytes (a sleeper on it must not wake for what it has seen).
    #[test]
    fn bytes_go_in_batches_and_at_settle() {
        for offset in modes() {
            let (mut tx, mut rx) = pair(offset);
            let mut space = [0u8; 64];
            let mut owed = 0;
            for _ in 0..DROP_READS {
                tx.write_all(&[7u8; 40]).unwrap();
                let n = next(&mut rx, &mut space);
                assert!(space[..n].iter().all(|&b| b == 7));
                owed = if offset { owed + n } else { n };
                assert_eq!(rx.owed, owed, "peek offset {offset}");
                assert!(readable(&rx), "a read peeks: the bytes are still there");
                if !offset {
                    break;
                }
            }
            tx.write_all(b"x").unwrap();
            assert_eq!(next(&mut rx, &mut space), 1);
            assert_eq!(&space[..1], b"x");
            assert_eq!(rx.owed, 1, "peek offset {offset}: what was owed went first");
            rx.settle(&mut [0u8; 4096]);
            assert!(!readable(&rx), "settle dropped what was read");
            assert_eq!(rx.owed, 0);
            tx.write_all(b"y").unwrap();
            assert_eq!(next(&mut rx, &mut space), 1);
            assert_eq!(&space[..1], b"y", "peek offset {offset}");
        }
    }

    /// End of stream reads as a zero-length read, as a plain recv does.
    #[test]
    fn eof_reads_empty() {
        for offset in modes() {
            let (tx, mut rx) = pair(offset);
            drop(tx);
            let r = loop {
                if let Some(r) = rx.read(&mut [0u8; 8]).unwrap() {
                    break r;
                }
            };
            assert_eq!(r.n, 0, "peek offset {offset}");
            assert!(!r.more);
        }
    }

    /// The end of the stream behind bytes still owed shows at the next
    /// read, and so does a reset: a peek offset hides neither.
    #[test]
    fn end_and_reset_behind_owed_bytes_show() {
        for offset in modes() {
            for reset in [false, true] {
                let (mut tx, mut rx) = pair(offset);
                tx.write_all(b"hello").unwrap();
                let mut space = [0u8; 16];
                assert_eq!(next(&mut rx, &mut space), 5);
                if reset {
                    socket2::SockRef::from(&tx)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
                drop(tx);
                let deadline = Instant::now() + Duration::from_secs(5);
                let got = loop {
                    match rx.read(&mut space) {
                        Ok(None) => assert!(Instant::now() < deadline, "nothing seen"),
                        r => break r,
                    }
                };
                match got {
                    Ok(Some(r)) => assert!(!reset && r.n == 0, "peek offset {offset}: {}", r.n),
                    Err(e) => assert!(reset, "peek offset {offset}: {e}"),
                    Ok(None) => unreachable!(),
                }
            }
        }
    }
}
