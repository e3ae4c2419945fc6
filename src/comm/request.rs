//! Requests: what `isend`, `irecv` and `iflush` hand out.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{RecvCore, SendCore};
use crate::error::{Error, Result};
use crate::request::{FdWaker, ReqState, Sizes};

/// How long `wait` polls, yielding the CPU between looks, before it sleeps.
/// Most requests finish within it and save the sleeping path's wake-ups.
/// Yielding, not spinning: when the thread that must answer shares our CPU
/// (wakers pull wakees onto their CPU), it runs at once. A 50 µs pure spin
/// left a ping-pong pair on one CPU of a 2-vCPU machine taking turns, each
/// turn a spin run out and a sleep: 64 B p99 64 µs, against 14–16 µs
/// yielding for 1 ms (docs/PERFORMANCE.md).
const SPIN: Duration = Duration::from_millis(1);

/// Longest sleep between looks at a request (a safety net: completions wake sleepers).
const SLICE: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub(crate) enum Owner {
    /// `large`: a message above the inline threshold (see `SendCore::lone_inline`).
    Send {
        core: Arc<SendCore>,
        large: bool,
    },
    Recv(Arc<RecvCore>),
    None,
}

impl Owner {
    /// Drives the comm's protocol.
    fn progress(&self) {
        match self {
            Owner::Send { core, .. } => core.drive(true),
            Owner::Recv(c) => c.drive(),
            Owner::None => {}
        }
    }

    /// Drops what the control socket showed already, so that a sleeper
    /// on it wakes only for new bytes.
    fn settle(&self) {
        match self {
            Owner::Send { core, .. } => core.settle(),
            Owner::Recv(c) => c.settle(),
            Owner::None => {}
        }
    }

    /// The control socket and eventfd a sleeper polls.
    fn sleep_on(&self) -> Option<(Option<i32>, &Arc<FdWaker>)> {
        match self {
            Owner::Send { core, .. } => Some((core.base.poll_fd(), &core.base.waker)),
            Owner::Recv(c) => Some((c.base.poll_fd(), &c.base.waker)),
            Owner::None => None,
        }
    }

    fn release(&self) {
        match self {
            Owner::Send { core, large } => core.release(*large),
            Owner::Recv(c) => c.base.release_slot(),
            Owner::None => {}
        }
    }
}

/// An operation in flight. Poll it with `test()` (never blocks) or `wait()`.
///
/// A request reports done, success or error, only when nothing in the
/// transport can still read or write its buffers (docs/PROTOCOL.md,
/// "Completion").
pub struct Request {
    state: Arc<ReqState>,
    owner: Owner,
    finished: Option<Result<Sizes>>,
}

impl Request {
    pub(crate) fn new(state: Arc<ReqState>, owner: Owner) -> Self {
        Request {
            state,
            owner,
            finished: None,
        }
    }

    /// `Ok(Some(sizes))` once done (bytes received per buffer, or sent);
    /// `Ok(None)` while in flight; `Err` once done with an error. Never
    /// blocks. After the first `Some` or `Err` it repeats that answer.
    pub fn test(&mut self) -> Result<Option<Sizes>> {
        if let Some(r) = &self.finished {
            return r.clone().map(Some);
        }
        if !self.state.is_done() {
            self.owner.progress();
        }
        match self.state.outcome() {
            None => Ok(None),
            Some(r) => {
                self.release();
                self.finished = Some(r.clone());
                r.map(Some)
            }
        }
    }

    /// Polls until done or `timeout` passes (`Error::Timeout`, the request
    /// stays in flight): for the first millisecond it yields the CPU between
    /// polls, then sleeps in poll(2) on the comm's control socket and
    /// eventfd between them. So a wait costs its thread up to a millisecond
    /// of CPU that any other runnable thread may take.
    pub fn wait(&mut self, timeout: Duration) -> Result<Sizes> {
        // Most small requests are done at the first look: no clock for them.
        if let Some(s) = self.test()? {
            return Ok(s);
        }
        let start = Instant::now();
        let deadline = start + timeout;
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
                std::thread::yield_now();
                continue;
            }
            sleep(&self.owner, &self.state, seen, deadline);
        }
    }

    /// A handle to sleep on this request without holding it, so that
    /// another thread may poll it meanwhile; it wakes on any completion or
    /// error after it was taken.
    pub fn waiter(&self) -> Waiter {
        Waiter {
            seen: self.state.generation(),
            state: self.state.clone(),
            owner: self.owner.clone(),
        }
    }

    fn release(&mut self) {
        std::mem::replace(&mut self.owner, Owner::None).release();
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

/// Sleeps on a request's progress (see [`Request::waiter`]).
pub struct Waiter {
    state: Arc<ReqState>,
    seen: u64,
    owner: Owner,
}

impl Waiter {
    /// Returns at the first completion or error since the waiter was taken
    /// (at once if one happened already), or after `timeout`; reads the
    /// comm's control socket meanwhile.
    pub fn wait(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.state.generation() == self.seen && !self.state.is_done() {
            self.owner.progress();
            if self.state.generation() != self.seen || Instant::now() >= deadline {
                return;
            }
            sleep(&self.owner, &self.state, self.seen, deadline);
        }
    }
}

/// Sleeps until the request moves past generation `seen`, the control
/// socket turns readable, or `deadline` (at most one slice).
fn sleep(owner: &Owner, state: &ReqState, seen: u64, deadline: Instant) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let Some((ctrl, waker)) = owner.sleep_on() else {
        return;
    };
    owner.settle();
    let efd = waker.sleep();
    let mut woken = false;
    if state.generation() == seen && !state.is_done() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(SLICE);
        let ms = left.as_micros().div_ceil(1000).max(1) as i32;
        let mut fds = Vec::with_capacity(2);
        if let Some(e) = &efd {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
        }
        // SAFETY: the comm, which `owner` keeps alive, owns the socket; it
        // stays open until the comm is dropped, after this call.
        let ctrl = ctrl.map(|fd| unsafe { BorrowedFd::borrow_raw(fd) });
        if let Some(fd) = ctrl {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
        // Only a written eventfd needs emptying (a read syscall otherwise spent).
        woken = efd.is_some()
            && fds
                .first()
                .and_then(|f| f.revents())
                .is_some_and(|r| r.contains(PollFlags::POLLIN));
    }
    if let Some(e) = efd {
        waker.woke(&e, woken);
    }
}
