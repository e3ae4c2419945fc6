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
mod link;
pub(crate) mod placement;
mod sock;
mod tx;
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
use crate::stats::{Counters, SockCounters};

pub(crate) use link::{CommLink, Lookup};
pub(crate) use placement::Placement;
pub(crate) use tx::{outq, set_int_option, SockId, TxChunk, TxMsg};
pub(crate) use uring::probe as probe_uring;

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
    /// TCP_NOTSENT_LOWAT of sending sockets (0: the kernel's default).
    pub notsent_lowat: u32,
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
        /// Its place in its comm.
        sock: SockId,
        counters: Arc<SockCounters>,
    },
    /// A comm has news for its sockets (chunks to send, a message
    /// announced, a chunk let go): look again at the sockets that wait.
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

    /// Ticks every watched comm, if a tick is due; true if it was.
    fn tick_if_due(&self) -> bool {
        {
            let mut next = lock(&self.next_tick);
            let now = Instant::now();
            if now < *next {
                return false;
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
        true
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
