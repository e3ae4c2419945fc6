//! Completion state shared by a request, the API thread and the workers.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::config::MAX_RECVS;
use crate::error::Error;

pub(crate) struct ReqState {
    /// Pieces still outstanding: unmatched receive buffers plus socket jobs.
    pending: AtomicUsize,
    error: Mutex<Option<Error>>,
    sizes: [AtomicU64; MAX_RECVS],
    n: usize,
    /// Bumped on every completion or error, so a waiter cannot miss one.
    generation: AtomicU64,
    /// Threads blocked in `wait_change`; completions skip the futex wake when zero.
    sleepers: AtomicUsize,
    cv_lock: Mutex<()>,
    cv: Condvar,
    /// Set on receives of a comm whose owner drives it (`take_over_progress`).
    waker: Option<Arc<FdWaker>>,
}

/// Lets a thread that sleeps in poll(2) on a comm's control socket also
/// wake when one of the comm's requests moves (the NIC workers complete
/// data pieces): notify writes the eventfd while the thread is armed.
pub(crate) struct FdWaker {
    pub efd: EventFd,
    pub armed: AtomicBool,
}

impl FdWaker {
    pub fn new() -> std::io::Result<Self> {
        Ok(FdWaker {
            efd: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            armed: AtomicBool::new(false),
        })
    }

    /// Empties the counter after a wake-up.
    pub fn drain(&self) {
        let _ = self.efd.read();
    }
}

impl ReqState {
    /// `n` sizes to report, `pending` pieces: socket jobs, plus one per
    /// receive buffer until it is matched to a message.
    pub fn new(n: usize, pending: usize) -> Self {
        ReqState {
            pending: AtomicUsize::new(pending),
            error: Mutex::new(None),
            sizes: Default::default(),
            n,
            generation: AtomicU64::new(0),
            sleepers: AtomicUsize::new(0),
            cv_lock: Mutex::new(()),
            cv: Condvar::new(),
            waker: None,
        }
    }

    pub fn with_waker(mut self, waker: Option<Arc<FdWaker>>) -> Self {
        self.waker = waker;
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
        {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.piece_done();
        self.notify();
    }

    /// Records an error without finishing a piece (the piece is dropped elsewhere).
    pub fn set_error(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn notify(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(w) = &self.waker {
            // Pairs with the sleeper's arm-then-check: one of the two sees the other.
            if w.armed.load(Ordering::SeqCst) {
                let _ = w.efd.write(1);
            }
        }
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders us after a sleeper's check-then-wait.
            let _g = self.cv_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.cv.notify_all();
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
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Sleeps until the generation moves past `seen` or `timeout` passes.
    pub fn wait_change(&self, seen: u64, timeout: Duration) {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let g = self.cv_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::SeqCst) == seen {
            let _ = self.cv.wait_timeout(g, timeout);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
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
