//! The sending end of a comm.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::request::{Owner, Request};
use super::{
    bytes, check_range, close_ctrl, lock, read_ctrl, write_ctrl, Agreed, CommBase, Ctrl, DataSock,
};
use crate::ctrl::{Params, SendEvent, SendSide, Token};
use crate::engine::{Cmd, CommLink, Job, Poke};
use crate::error::{Error, Result};
use crate::memory::{MemoryRegion, PtrKind, Region, TxPath};
use crate::net::NetInner;
use crate::request::ReqState;

/// Smallest chunk of a CUDA message cut across sockets. Measured: a 256
/// KiB message in two 128 KiB chunks went 0.77x -> 0.89x of host TCP; more
/// chunks per socket (4 of at least 128 KiB) cost 1-4 MiB messages
/// 0.76-0.83x -> 0.61-0.72x, so each socket gets one.
const MIN_CUDA_CHUNK: usize = 128 << 10;

/// How long a closing comm lets its last control bytes reach the peer.
const CLOSE_PATIENCE: Duration = Duration::from_millis(200);

struct Chunked {
    region: Arc<Region>,
    offset: u64,
    len: u64,
    chunk_size: u64,
}

struct Pending {
    state: Arc<ReqState>,
    /// `None` for inline messages.
    chunked: Option<Chunked>,
}

pub(crate) struct SendCtrl {
    stream: TcpStream,
    side: SendSide,
    /// Requests whose protocol piece (write, refusal or acknowledgement) is open.
    reqs: HashMap<Token, Pending>,
    next_token: Token,
    /// Data socket that carries the next message's first chunk.
    cursor: usize,
    events: Vec<SendEvent>,
}

pub(crate) struct SendCore {
    pub(super) base: CommBase,
    ctrl: Ctrl<SendCtrl>,
    /// The first failure a data socket reported.
    failure: std::sync::Mutex<Option<Error>>,
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

/// The sending comm as its data sockets see it.
struct SendLink(Weak<SendCore>);

impl CommLink for SendLink {
    fn failed(&self, e: Error) {
        if let Some(core) = self.0.upgrade() {
            lock(&core.failure).get_or_insert(e);
            core.nudge();
        }
    }
}

impl SendComm {
    /// A comm over `ctrl` and the data sockets `data` (stream, NIC), which
    /// it hands to the NIC workers.
    pub(crate) fn new(
        net: Arc<NetInner>,
        ctrl: TcpStream,
        data: Vec<(usize, TcpStream)>,
        agreed: Agreed,
    ) -> Result<Self> {
        let cfg = &net.cfg;
        let params = Params {
            timeout: cfg.peer_timeout,
            peer_timeout: agreed.peer_timeout,
            inline_threshold: cfg.inline_threshold,
        };
        let watch = net.watch_ctrl(&ctrl, data.first().map_or(0, |d| d.0))?;
        let core = Arc::new_cyclic(|me: &Weak<SendCore>| {
            let link: Arc<dyn CommLink> = Arc::new(SendLink(me.clone()));
            let socks: Vec<DataSock> = data
                .into_iter()
                .map(|(nic, s)| net.add_data_socket(nic, s, link.clone(), false))
                .collect();
            let target: Weak<dyn Poke> = me.clone();
            watch.bind(target);
            SendCore {
                base: CommBase::new(net.clone(), socks, watch, &ctrl),
                ctrl: Ctrl::new(SendCtrl {
                    stream: ctrl,
                    side: SendSide::new(params, Instant::now()),
                    reqs: HashMap::new(),
                    next_token: 0,
                    cursor: 0,
                    events: Vec::new(),
                }),
                failure: Default::default(),
            }
        });
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
        core.base.check_open()?;
        check_range(mr, offset, len)?;
        let cfg = &core.base.net.cfg;
        if core.base.inflight.load(Ordering::Acquire) >= cfg.max_requests {
            return Ok(None);
        }
        let n = core.base.socks.len();
        let inline = len <= cfg.inline_threshold || len == 0;
        let state = Arc::new(ReqState::new(1, 1).with_waker(core.base.waker.clone()));
        state.set_size(0, len as u64);
        core.ctrl.with(
            |c| -> Result<()> {
                if let Some(e) = c.side.broken() {
                    return Err(e.clone());
                }
                let token = c.next_token;
                c.next_token += 1;
                let mut events = std::mem::take(&mut c.events);
                let mut ev = |e| events.push(e);
                if inline {
                    let src = mr.inner.source(offset as u64, len)?;
                    // SAFETY: TxPath hands out `len` readable bytes; `mr` holds the region for this call.
                    let body = unsafe { bytes(src, len) };
                    c.reqs.insert(
                        token,
                        Pending {
                            state: state.clone(),
                            chunked: None,
                        },
                    );
                    c.side.send_inline(token, tag, body, &mut ev)?;
                    // The bytes were copied: staging may be reused.
                    mr.inner.sent(offset as u64, len);
                } else {
                    let chunk = match mr.inner.kind() {
                        PtrKind::Host => cfg.chunk_size,
                        // Large chunks amortize each staging copy's fixed cost, but not
                        // at the price of idle sockets: a message spans all of them.
                        PtrKind::Cuda => len
                            .div_ceil(n)
                            .next_multiple_of(4096)
                            .clamp(MIN_CUDA_CHUNK.min(cfg.cuda_chunk_size), cfg.cuda_chunk_size),
                    };
                    c.reqs.insert(
                        token,
                        Pending {
                            state: state.clone(),
                            chunked: Some(Chunked {
                                region: mr.inner.clone(),
                                offset: offset as u64,
                                len: len as u64,
                                chunk_size: chunk as u64,
                            }),
                        },
                    );
                    c.side
                        .send_chunked(token, len as u64, tag, chunk as u32, &mut ev)?;
                }
                c.events = events;
                if !more {
                    // Posts are read only when something waits for them.
                    let read = c.side.awaits_peer();
                    core.progress(c, read);
                }
                Ok(())
            },
            |c| core.progress(c, true),
        )?;
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
        core.ctrl.with(
            |c| {
                // Bytes of finished requests are in the kernel already; let
                // queued ones (of requests failing now) go too, if they can.
                c.side.bye();
                core.progress(c, false);
                c.side.fail(Error::Closed);
                core.progress(c, false);
                close_ctrl(&c.stream, CLOSE_PATIENCE);
            },
            |_| {},
        );
        core.base.close_data();
    }
}

impl SendCore {
    pub(super) fn nudge(&self) {
        self.ctrl.nudge(|c| self.progress(c, true));
    }

    /// Drives the protocol (`read`: also take in what the receiver sent).
    pub(super) fn drive(&self, read: bool) {
        self.ctrl
            .with(|c| self.progress(c, read), |c| self.progress(c, true));
    }

    /// Moves bytes both ways and acts on what the protocol says, until it
    /// says nothing more. Reads only when asked: an inline send needs no
    /// answer, and heartbeats are checked only after reading what came.
    fn progress(&self, c: &mut SendCtrl, read: bool) {
        let now = Instant::now();
        let mut events = std::mem::take(&mut c.events);
        let failure = lock(&self.failure).clone();
        // A peer's Bye explains its data sockets' EOF: read before failing.
        let read = read || failure.is_some();
        loop {
            if read && c.side.broken().is_none() {
                loop {
                    match read_ctrl(&c.stream, c.side.inbox_space()) {
                        Ok(Some(n)) => {
                            c.side.received(n, now, &mut |e| events.push(e));
                            if n == 0 {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            c.side.fail(e);
                            break;
                        }
                    }
                }
                c.side.poll(now);
            }
            if let Some(e) = &failure {
                c.side.fail(e.clone());
            }
            while c.side.broken().is_none() && !c.side.output().is_empty() {
                match write_ctrl(&c.stream, c.side.output()) {
                    Ok(0) => break,
                    Ok(n) => c.side.wrote(n, now, &mut |e| events.push(e)),
                    Err(e) => c.side.fail(e),
                }
            }
            if events.is_empty() {
                break;
            }
            for e in events.drain(..) {
                self.act(c, e);
            }
        }
        c.events = events;
        if let Some(e) = c.side.broken().cloned() {
            for (_, p) in c.reqs.drain() {
                p.state.fail(e.clone());
            }
            self.base.close_data();
            return;
        }
        self.base
            .arm(c.side.awaits_peer(), !c.side.output().is_empty());
        self.base.set_due(c.side.due());
    }

    fn act(&self, c: &mut SendCtrl, e: SendEvent) {
        match e {
            SendEvent::Written(t) | SendEvent::Acked(t) => {
                if let Some(p) = c.reqs.remove(&t) {
                    p.state.piece_done();
                }
            }
            SendEvent::Refused { token, err } => {
                if let Some(p) = c.reqs.remove(&token) {
                    p.state.fail(err);
                }
            }
            SendEvent::Start { token, seq } => {
                let Some(p) = c.reqs.get(&token) else { return };
                let Some(m) = p.chunked.as_ref() else { return };
                let n = self.base.socks.len();
                let plan: Vec<_> = Job::plan(m.len, m.chunk_size, c.cursor, n).collect();
                c.cursor = (c.cursor + Job::n_chunks(m.len, m.chunk_size) as usize) % n;
                p.state.add_pieces(plan.len());
                for (s, first) in plan {
                    let sock = self.base.socks[s];
                    self.base.net.workers[sock.worker].submit(Cmd::Send {
                        id: sock.id,
                        job: Job {
                            req: p.state.clone(),
                            region: m.region.clone(),
                            base: m.offset,
                            seq,
                            size: m.len,
                            chunk_size: m.chunk_size,
                            next_chunk: first,
                            stride: n as u64,
                            zc_last: None,
                        },
                    });
                }
            }
        }
    }
}

impl Poke for SendCore {
    fn poke(&self) {
        self.base.poked();
        self.nudge();
    }

    fn tick(&self) {
        if self.base.tick_due() {
            self.nudge();
        }
    }
}
