//! The progress engine: one worker thread per NIC moves chunks on that NIC's
//! data sockets. API calls hand work over a crossbeam channel; idle workers
//! sleep (in epoll, or in io_uring_enter), they never spin.
//!
//! Two engines drive the same per-socket state machine (`sock.rs`):
//! `epoll` (non-blocking syscalls on ready sockets) and `uring` (batched
//! io_uring submissions, SEND_ZC for zero-copy).

mod devmem_rx;
mod devmem_tx;
mod epoll;
pub(crate) mod placement;
mod sock;
mod uring;

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::{EngineKind, ZeroCopy};
use crate::error::{Error, Result};
use crate::memory::Region;
use crate::request::ReqState;
use crate::stats::Counters;

pub(crate) use placement::{CommLink, Lookup, Placement};
pub(crate) use uring::probe as probe_uring;

/// The chunks of one message that travel on one data socket:
/// chunk indices `first, first + stride, …` below `ceil(size / chunk_size)`.
pub(crate) struct Job {
    pub req: Arc<ReqState>,
    pub region: Arc<Region>,
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

    /// Offset and length of chunk `k` of the message.
    fn chunk_at(&self, k: u64) -> (u64, usize) {
        let off = k * self.chunk_size;
        (off, (self.size - off).min(self.chunk_size) as usize)
    }

    fn chunk(&self) -> (u64, usize) {
        self.chunk_at(self.next_chunk)
    }

    /// The chunk after the current one, if the job has one.
    fn following_chunk(&self) -> Option<(u64, usize)> {
        let k = self.next_chunk + self.stride;
        (k * self.chunk_size < self.size).then(|| self.chunk_at(k))
    }

    /// Moves to the next chunk; true when the job has no more.
    fn advance(&mut self) -> bool {
        self.next_chunk += self.stride;
        self.next_chunk * self.chunk_size >= self.size
    }
}

/// A comm whose control socket a worker watches: readiness pokes it, and
/// every tick ticks it (heartbeats, timeouts) whether or not anyone polls.
pub(crate) trait Poke: Send + Sync {
    fn poke(&self);
    fn tick(&self);
}

/// How a data socket moves payload.
#[derive(Clone)]
pub(crate) struct TxMode {
    pub zerocopy: ZeroCopy,
    /// Smallest payload sent with MSG_ZEROCOPY.
    pub min_zcopy: usize,
    /// Receive through a devmem socket (the kernel's or the emulated NIC's).
    pub devmem: Option<crate::path::DevmemSpec>,
    /// Send by devmem TX: the socket's NIC and how it sends.
    pub devmem_tx: Option<(usize, crate::path::TxDevmem)>,
    /// TCP_USER_TIMEOUT of the socket (its ETIMEDOUT means an unresponsive peer).
    pub peer_timeout_ms: u64,
    /// Set TCP_QUICKACK each time a received chunk completes
    /// (`NCCL_GPUDIRECTTCPX_FORCE_ACK`), so the sender is not held by delayed ACKs.
    pub quickack: bool,
}

pub(crate) enum Cmd {
    Add {
        id: u64,
        stream: TcpStream,
        tx: TxMode,
        comm: Arc<dyn CommLink>,
        /// The socket receives chunks (a receive comm's); else it sends them.
        receives: bool,
    },
    Send {
        id: u64,
        job: Job,
    },
    /// A receive comm learned of more messages: look again at sockets that wait for one.
    Kick,
    Close {
        id: u64,
    },
    Shutdown,
}

pub(crate) struct Worker {
    tx: Sender<Cmd>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    pub watches: Arc<WatchSet>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a worker on `engine` (already resolved: `Auto` is not accepted
    /// here) that ticks its watched comms every `tick`.
    pub fn spawn(
        name: String,
        engine: EngineKind,
        counters: Arc<Counters>,
        tick: Duration,
    ) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| Error::io("eventfd", e.into()))?,
        );
        let sleeping = Arc::new(AtomicBool::new(false));
        let watches = Arc::new(WatchSet::new(tick)?);
        let builder = std::thread::Builder::new().name(name);
        let thread = match engine {
            EngineKind::Uring => {
                let mut l = uring::UringLoop::new(
                    rx,
                    wake.clone(),
                    sleeping.clone(),
                    counters,
                    watches.clone(),
                )?;
                builder.spawn(move || l.run())
            }
            EngineKind::Epoll | EngineKind::Auto => {
                let mut l = epoll::EpollLoop::new(
                    rx,
                    wake.clone(),
                    sleeping.clone(),
                    counters,
                    watches.clone(),
                )?;
                builder.spawn(move || l.run())
            }
        }
        .map_err(|e| Error::io("spawn worker", e))?;
        Ok(Worker {
            tx,
            wake,
            sleeping,
            watches,
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
            // The last owner may be this worker itself (a poke upgraded the
            // last reference to a comm): it exits on Shutdown, no join.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Control sockets watched for their comms, in an epoll set of their own
/// that the worker polls (nested in its epoll set, or by io_uring's
/// POLL_ADD). Comms arm their watch themselves, from any thread: one-shot,
/// only while they await the peer, so a message nobody waits for wakes no
/// worker.
pub(crate) struct WatchSet {
    epoll: Epoll,
    targets: Mutex<HashMap<u64, Watched>>,
    next_id: std::sync::atomic::AtomicU64,
    tick: Duration,
    next_tick: Mutex<Instant>,
}

/// A watched control socket (a duplicate fd) and the comm it pokes.
type Watched = (OwnedFd, Weak<dyn Poke>);

/// A comm's registration in a worker's [`WatchSet`]; dropping it ends the watch.
pub(crate) struct Watch {
    set: Arc<WatchSet>,
    id: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WatchSet {
    fn new(tick: Duration) -> Result<Self> {
        Ok(WatchSet {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                .map_err(|e| Error::io("epoll_create", e.into()))?,
            targets: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
            tick,
            next_tick: Mutex::new(Instant::now() + tick),
        })
    }

    /// Watches `stream` (a duplicate of its fd), disarmed, for nobody yet
    /// (see [`Watch::bind`]).
    pub fn watch(self: &Arc<Self>, stream: &TcpStream) -> Result<Watch> {
        let fd: OwnedFd = stream
            .try_clone()
            .map_err(|e| Error::io("dup control socket", e))?
            .into();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.epoll
            .add(&fd, EpollEvent::new(EpollFlags::EPOLLONESHOT, id))
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        let nobody: Weak<dyn Poke> = Weak::<Nobody>::new();
        lock(&self.targets).insert(id, (fd, nobody));
        Ok(Watch {
            set: self.clone(),
            id,
        })
    }

    /// Pokes the comms whose sockets turned ready (their watches disarm).
    fn dispatch(&self) {
        let mut events = [EpollEvent::empty(); 32];
        loop {
            let n = self
                .epoll
                .wait(&mut events, EpollTimeout::ZERO)
                .unwrap_or(0);
            for ev in &events[..n] {
                let target = lock(&self.targets).get(&ev.data()).map(|(_, t)| t.clone());
                if let Some(t) = target.and_then(|t| t.upgrade()) {
                    t.poke();
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// Time until the next tick (zero when due).
    fn until_tick(&self) -> Duration {
        lock(&self.next_tick).saturating_duration_since(Instant::now())
    }

    /// Ticks every watched comm, if a tick is due.
    fn tick_if_due(&self) {
        {
            let mut next = lock(&self.next_tick);
            let now = Instant::now();
            if now < *next {
                return;
            }
            *next = now + self.tick;
        }
        let targets: Vec<Weak<dyn Poke>> = lock(&self.targets)
            .values()
            .map(|(_, t)| t.clone())
            .collect();
        for t in targets {
            if let Some(t) = t.upgrade() {
                t.tick();
            }
        }
    }
}

impl AsFd for WatchSet {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }
}

/// The target of a watch not yet bound.
struct Nobody;

impl Poke for Nobody {
    fn poke(&self) {}
    fn tick(&self) {}
}

impl Watch {
    /// Names the comm that the watch pokes and ticks.
    pub fn bind(&self, target: Weak<dyn Poke>) {
        if let Some(w) = lock(&self.set.targets).get_mut(&self.id) {
            w.1 = target;
        }
    }

    /// Arms the watch for one wake-up on readable (`read`) or writable (`write`).
    pub fn arm(&self, read: bool, write: bool) {
        let mut flags = EpollFlags::EPOLLONESHOT | EpollFlags::EPOLLRDHUP;
        if read {
            flags |= EpollFlags::EPOLLIN;
        }
        if write {
            flags |= EpollFlags::EPOLLOUT;
        }
        if let Some((fd, _)) = lock(&self.set.targets).get(&self.id) {
            let _ = self
                .set
                .epoll
                .modify(fd, &mut EpollEvent::new(flags, self.id));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some((fd, _)) = lock(&self.set.targets).remove(&self.id) {
            let _ = self.set.epoll.delete(&fd);
        }
    }
}

/// Hands a job to its socket, or fails it when the socket is gone (closed).
fn route(job: Job, sock: Option<&mut sock::Sock>) {
    match sock {
        Some(s) => s.enqueue(job),
        None => job.finish(Some(Error::Closed)),
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

/// # Safety
/// `p` must be valid for writes of `len` bytes, and not otherwise accessed, for the returned lifetime.
unsafe fn bytes_mut<'a>(p: *mut u8, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
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
