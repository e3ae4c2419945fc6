//! The progress engine: one worker thread per NIC moves chunks on that NIC's
//! data sockets. API calls hand work over a crossbeam channel; idle workers
//! sleep (in epoll, or in io_uring_enter), they never spin.
//!
//! Two engines drive the same per-socket state machine (`sock.rs`):
//! `epoll` (non-blocking syscalls on ready sockets) and `uring` (batched
//! io_uring submissions, SEND_ZC for zero-copy).

mod devmem_rx;
mod epoll;
mod sock;
mod uring;

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::{EngineKind, ZeroCopy};
use crate::error::{Error, Result};
use crate::memory::Region;
use crate::request::ReqState;
use crate::stats::Counters;

pub(crate) use uring::probe as probe_uring;

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

/// A control socket the worker watches for its owner, so that a comm
/// progresses even while its caller waits on the other end.
pub(crate) trait Poke: Send + Sync {
    fn poke(&self);
}

/// How a data socket moves payload.
#[derive(Clone)]
pub(crate) struct TxMode {
    pub zerocopy: ZeroCopy,
    /// Smallest payload sent with MSG_ZEROCOPY.
    pub min_zcopy: usize,
    /// Receive through an emulated devmem NIC of this ABI with a pool of this size.
    pub devmem_emulated: Option<(devmem::sockabi::KernelAbi, crate::gpumemd::PoolSource)>,
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

pub(crate) struct Worker {
    tx: Sender<Cmd>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts a worker on `engine` (already resolved: `Auto` is not accepted here).
    pub fn spawn(name: String, engine: EngineKind, counters: Arc<Counters>) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| Error::io("eventfd", e.into()))?,
        );
        let sleeping = Arc::new(AtomicBool::new(false));
        let builder = std::thread::Builder::new().name(name);
        let thread = match engine {
            EngineKind::Uring => {
                let mut l = uring::UringLoop::new(rx, wake.clone(), sleeping.clone(), counters)?;
                builder.spawn(move || l.run())
            }
            EngineKind::Epoll | EngineKind::Auto => {
                let mut l = epoll::EpollLoop::new(rx, wake.clone(), sleeping.clone(), counters)?;
                builder.spawn(move || l.run())
            }
        }
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
            // The last owner may be this worker itself (a poke upgraded the
            // last reference to a comm): it exits on Shutdown, no join.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// Control sockets watched for their owners (both engines keep them in an epoll set).
#[derive(Default)]
struct Watches(std::collections::HashMap<u64, (OwnedFd, Weak<dyn Poke>)>);

impl Watches {
    fn add(
        &mut self,
        set: &nix::sys::epoll::Epoll,
        id: u64,
        fd: OwnedFd,
        out: bool,
        target: Weak<dyn Poke>,
    ) {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        let dir = if out {
            EpollFlags::EPOLLOUT
        } else {
            EpollFlags::EPOLLIN
        };
        let flags = dir | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        if set.add(&fd, EpollEvent::new(flags, id)).is_ok() {
            self.0.insert(id, (fd, target));
        }
    }

    fn remove(&mut self, set: &nix::sys::epoll::Epoll, id: u64) {
        if let Some((fd, _)) = self.0.remove(&id) {
            let _ = set.delete(&fd);
        }
    }

    /// Pokes the owner of watch `id`; false if `id` is not a watch.
    fn fire(&self, id: u64) -> bool {
        match self.0.get(&id) {
            Some((_, w)) => {
                if let Some(t) = w.upgrade() {
                    t.poke();
                }
                true
            }
            None => false,
        }
    }
}

/// Hands a job to its socket, or fails it when the socket is gone (closed).
fn route(job: Job, sock: Option<&mut sock::Sock>, send: bool) {
    match sock {
        Some(s) => s.enqueue(job, send),
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
