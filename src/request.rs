//! Completion state shared by a request, the API thread and the workers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::config::MAX_RECVS;
use crate::error::Error;

pub(crate) struct ReqState {
    /// Pieces still outstanding: unmatched receive buffers plus socket jobs.
    pending: AtomicUsize,
    /// Receive buffers not yet matched to a message.
    unmatched: AtomicUsize,
    error: Mutex<Option<Error>>,
    sizes: [AtomicU64; MAX_RECVS],
    n: usize,
    cv_lock: Mutex<()>,
    cv: Condvar,
}

impl ReqState {
    /// A send (n = 1) or flush (n = 0): `pending` socket jobs.
    pub fn new(n: usize, pending: usize) -> Self {
        Self::with_unmatched(n, pending, 0)
    }

    /// A receive of `n` buffers, none matched yet.
    pub fn receive(n: usize) -> Self {
        Self::with_unmatched(n, n, n)
    }

    fn with_unmatched(n: usize, pending: usize, unmatched: usize) -> Self {
        ReqState {
            pending: AtomicUsize::new(pending),
            unmatched: AtomicUsize::new(unmatched),
            error: Mutex::new(None),
            sizes: Default::default(),
            n,
            cv_lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    pub fn add_pieces(&self, k: usize) {
        self.pending.fetch_add(k, Ordering::AcqRel);
    }

    pub fn matched_one(&self) {
        self.unmatched.fetch_sub(1, Ordering::AcqRel);
    }

    /// True while some receive buffer still waits for its message.
    pub fn has_unmatched(&self) -> bool {
        self.unmatched.load(Ordering::Acquire) > 0
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
        let _g = self.cv_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
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

    /// Sleeps until a piece finishes or `timeout` passes.
    pub fn wait_change(&self, timeout: Duration) {
        let g = self.cv_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_done() {
            return;
        }
        let _ = self.cv.wait_timeout(g, timeout);
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
