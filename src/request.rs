//! Completion state shared by a request, the API thread and the workers.
//!
//! A request is a count of pieces (receive buffers, socket jobs, the
//! peer's acknowledgement) and the first error any of them met. It is
//! done when every piece is: an error is reported only then, so nothing
//! in the transport still uses the request's memory when it is.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::MAX_RECVS;
use crate::error::Error;

pub(crate) struct ReqState {
    pending: AtomicUsize,
    /// The first error: a successful outcome reads it with one load.
    error: OnceLock<Error>,
    sizes: [AtomicU64; MAX_RECVS],
    n: usize,
    /// Bumped on every completion or error, so a waiter cannot miss one.
    generation: AtomicU64,
    /// The comm's eventfd, written when a piece finishes while a thread sleeps on it.
    waker: Option<Arc<FdWaker>>,
}

/// Lets threads that sleep in poll(2) on a comm's control socket also wake
/// when one of the comm's requests moves (NIC workers finish pieces):
/// each sleeper polls an eventfd of its own thread, which completions write.
#[derive(Default)]
pub(crate) struct FdWaker {
    /// Threads asleep now; completions skip the lock when zero.
    sleepers: AtomicUsize,
    fds: Mutex<Vec<Arc<EventFd>>>,
}

thread_local! {
    static SLEEP_FD: Option<Arc<EventFd>> =
        EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).ok().map(Arc::new);
}

impl FdWaker {
    /// Registers the calling thread as asleep on the comm; `None` if the
    /// thread has no eventfd (out of fds), then it sleeps a slice at most.
    pub fn sleep(&self) -> Option<Arc<EventFd>> {
        let fd = SLEEP_FD.with(|f| f.clone())?;
        self.fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fd.clone());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        Some(fd)
    }

    /// The thread woke; `written`: by its eventfd, emptied for the next sleep.
    pub fn woke(&self, fd: &Arc<EventFd>, written: bool) {
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = fds.iter().position(|f| Arc::ptr_eq(f, fd)) {
            fds.swap_remove(i);
        }
        drop(fds);
        if written {
            let _ = fd.read();
        }
    }

    fn wake_all(&self) {
        // Pairs with the sleeper's register-then-check: one of the two sees the other.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            for f in self.fds.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = f.write(1);
            }
        }
    }
}

impl ReqState {
    /// `n` sizes to report, `pending` pieces.
    pub fn new(n: usize, pending: usize) -> Self {
        ReqState {
            pending: AtomicUsize::new(pending),
            error: OnceLock::new(),
            sizes: Default::default(),
            n,
            generation: AtomicU64::new(0),
            waker: None,
        }
    }

    pub fn with_waker(mut self, waker: Arc<FdWaker>) -> Self {
        self.waker = Some(waker);
        self
    }

    pub fn add_pieces(&self, k: usize) {
        self.pending.fetch_add(k, Ordering::AcqRel);
    }

    pub fn piece_done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify();
        }
    }

    /// Records the first error and counts the piece as finished.
    pub fn fail(&self, e: Error) {
        self.set_error(e);
        self.piece_done();
    }

    /// Records an error (the first one wins) without finishing a piece.
    pub fn set_error(&self, e: Error) {
        let _ = self.error.set(e);
    }

    fn notify(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(w) = &self.waker {
            w.wake_all();
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn set_size(&self, i: usize, size: u64) {
        self.sizes[i].store(size, Ordering::Release);
    }

    pub fn sizes(&self) -> Sizes {
        let mut s = Sizes {
            n: self.n,
            v: [0; MAX_RECVS],
        };
        for i in 0..self.n {
            s.v[i] = self.sizes[i].load(Ordering::Acquire);
        }
        s
    }

    pub fn error(&self) -> Option<Error> {
        self.error.get().cloned()
    }

    pub fn is_done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// The outcome once every piece is done: the first error, else the sizes.
    pub fn outcome(&self) -> Option<Result<Sizes, Error>> {
        if !self.is_done() {
            return None;
        }
        Some(match self.error() {
            Some(e) => Err(e),
            None => Ok(self.sizes()),
        })
    }
}

/// Sizes of a finished request: one per buffer of a grouped receive, one for a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    n: usize,
    v: [u64; MAX_RECVS],
}

impl Sizes {
    pub fn as_slice(&self) -> &[u64] {
        &self.v[..self.n]
    }
}

impl std::ops::Deref for Sizes {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_reported_only_when_every_piece_is_done() {
        let r = ReqState::new(2, 3);
        r.fail(Error::TagMismatch(9));
        assert_eq!(r.outcome(), None, "two pieces still write the buffers");
        r.piece_done();
        r.fail(Error::Closed);
        assert_eq!(
            r.outcome(),
            Some(Err(Error::TagMismatch(9))),
            "the first error wins"
        );
    }
}
