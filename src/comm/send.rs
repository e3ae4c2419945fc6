//! The sending end of a comm.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::redial::Dials;
use super::request::{Owner, Request};
use super::{bytes, check_range, lock, Agreed, CommBase, Ctrl, CtrlSocket, PEER_END_GRACE};
use crate::ctrl::sched::{Retired, Sched, Why};
use crate::ctrl::{OwnMap, Params, SendEvent, SendSide, Token};
use crate::engine::{CommLink, Poke, SockId, TxChunk, TxMsg};
use crate::error::{Error, Result};
use crate::memory::{Lane, MemoryRegion, PtrKind, Region, TxPath};
use crate::net::NetInner;
use crate::request::ReqState;
use crate::stats::SocketStats;

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
    /// A chunked message not started yet (`None` for inline messages).
    chunked: Option<Chunked>,
    /// A chunked message's number once started.
    seq: Option<u64>,
}

pub(crate) struct SendCtrl {
    stream: CtrlSocket,
    side: SendSide,
    /// Requests whose protocol piece (write, refusal or acknowledgement) is open.
    reqs: OwnMap<Pending>,
    next_token: Token,
    events: Vec<SendEvent>,
    /// Retired sockets being connected again.
    dials: Dials,
    /// Retirements to act on, and when.
    retired: Vec<(Retired, Instant)>,
}

pub(crate) struct SendCore {
    pub(super) base: CommBase,
    ctrl: Ctrl<SendCtrl>,
    link: Arc<SendLink>,
    /// A message up to this size goes inline when no other message above
    /// the inline threshold is in flight (both ends' `inline_idle_max`).
    lone_inline: usize,
    /// Requests in flight of messages above the inline threshold.
    large_inflight: AtomicUsize,
    /// Whether the last such message found none in flight.
    last_large_alone: AtomicBool,
}

/// The sending end of a connection (from `Net::connect`).
pub struct SendComm {
    core: Arc<SendCore>,
}

impl std::fmt::Debug for SendComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SendComm({} data sockets)", self.core.base.n_data())
    }
}

/// A data socket's stream as it last published it (`CommLink::publish`).
#[derive(Default)]
struct View {
    gen: AtomicU32,
    acked: AtomicU64,
    end: AtomicU64,
}

/// The sending comm as its data sockets see it: the chunks they pull.
struct SendLink {
    core: Weak<SendCore>,
    sched: Mutex<Sched<Arc<TxMsg>>>,
    /// The scheduler may hold retirements (see `SendLink::sched`).
    retired: AtomicBool,
    /// Bumped whenever the scheduler may have a chunk for a socket that
    /// found none (see `CommLink::epoch`).
    epoch: AtomicU64,
    /// Per data socket: what it last published about its stream.
    views: Vec<View>,
    /// The first failure a data socket reported that fails the comm.
    failure: OnceLock<Error>,
}

/// The scheduler, locked; flags its retirements when let go, so that the
/// protocol looks for them without taking the lock on every progress.
struct SchedGuard<'a> {
    s: MutexGuard<'a, Sched<Arc<TxMsg>>>,
    retired: &'a AtomicBool,
}

impl std::ops::Deref for SchedGuard<'_> {
    type Target = Sched<Arc<TxMsg>>;
    fn deref(&self) -> &Self::Target {
        &self.s
    }
}

impl std::ops::DerefMut for SchedGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.s
    }
}

impl Drop for SchedGuard<'_> {
    fn drop(&mut self) {
        if self.s.has_retired() {
            self.retired.store(true, Ordering::Release);
        }
    }
}

impl SendLink {
    fn sched(&self) -> SchedGuard<'_> {
        SchedGuard {
            s: lock(&self.sched),
            retired: &self.retired,
        }
    }

    /// The scheduler may have work for sockets that found none: they ask
    /// again (their workers are woken).
    /// Lets go of the scheduler first, so that a woken worker does not
    /// wake only to wait for its lock.
    fn news(&self, mut s: SchedGuard<'_>) {
        let woken = s.take_woken();
        drop(s);
        if !woken.is_empty() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            if let Some(core) = self.core.upgrade() {
                core.base.kick_slots(&woken);
            }
        }
    }

    fn nudge(&self) {
        if let Some(core) = self.core.upgrade() {
            core.nudge();
        }
    }
}

impl CommLink for SendLink {
    fn failed(&self, e: Error) {
        let _ = self.failure.set(e);
        self.nudge();
    }

    fn lost(&self, id: SockId, e: Error) {
        let mut s = self.sched();
        if s.retire(id.index as usize, id.gen, Why::Failed(e)) {
            self.news(s);
            self.nudge();
        }
    }

    fn pull(&self, id: SockId, acked: u64, end: u64, now: Instant) -> Option<TxChunk> {
        // Views are never older than what the scheduler was told: a stale
        // one would make a busy socket look idle (and never stall).
        self.publish(id, acked, end);
        let mut s = self.sched();
        for (j, v) in self.views.iter().enumerate() {
            if j != id.index as usize {
                let gen = v.gen.load(Ordering::Acquire);
                s.view(
                    j,
                    gen,
                    v.acked.load(Ordering::Acquire),
                    v.end.load(Ordering::Acquire),
                    now,
                );
            }
        }
        let a = s.pull(id.index as usize, id.gen, acked, end, now)?;
        self.news(s);
        Some(TxChunk::new(a.m, a.k, a.again))
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn publish(&self, id: SockId, acked: u64, end: u64) {
        // The generation last: a reader that sees it sees its stream.
        if let Some(v) = self.views.get(id.index as usize) {
            v.acked.store(acked, Ordering::Release);
            v.end.store(end, Ordering::Release);
            v.gen.store(id.gen, Ordering::Release);
        }
    }

    fn sample(&self, id: SockId, acked: u64, end: u64, now: Instant) {
        self.publish(id, acked, end);
        let mut s = self.sched();
        s.sample(id.index as usize, id.gen, acked, end, now);
        if s.has_retired() {
            self.news(s);
            self.nudge();
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
            inline_max: agreed.inline_max,
        };
        let watch = net.watch_ctrl(&ctrl, data.first().map_or(0, |d| d.0))?;
        let now = Instant::now();
        let nics: Vec<usize> = data.iter().map(|d| d.0).collect();
        let n_data = data.len();
        let core = Arc::new_cyclic(|me: &Weak<SendCore>| {
            let link = Arc::new(SendLink {
                core: me.clone(),
                sched: Mutex::new(Sched::new(&nics, cfg.stall_timeout, now)),
                retired: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
                views: (0..data.len()).map(|_| View::default()).collect(),
                failure: OnceLock::new(),
            });
            let as_link: Arc<dyn CommLink> = link.clone();
            let target: Weak<dyn Poke> = me.clone();
            watch.bind(target);
            SendCore {
                base: CommBase::new(net.clone(), data, &as_link, false, watch, &ctrl),
                ctrl: Ctrl::new(SendCtrl {
                    stream: CtrlSocket::new(ctrl, false),
                    side: SendSide::new(params, now),
                    reqs: OwnMap::default(),
                    next_token: 0,
                    events: Vec::new(),
                    dials: Dials::new(n_data),
                    retired: Vec::new(),
                }),
                link,
                lone_inline: agreed.inline_max,
                large_inflight: AtomicUsize::new(0),
                last_large_alone: AtomicBool::new(true),
            }
        });
        Ok(SendComm { core })
    }

    /// Number of data sockets this comm stripes over (in use or not).
    pub fn data_sockets(&self) -> usize {
        self.core.base.n_data()
    }

    /// What each data socket did: bytes, chunks, re-sends, stalls.
    pub fn socket_stats(&self) -> Vec<SocketStats> {
        self.core.base.stats()
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

    /// [`SendComm::isend`] for a message that another follows at once: an
    /// inline one (docs/PROTOCOL.md, **Msg**) waits in the control
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
        let n = core.base.live().max(1);
        // A lone mid-size message goes inline: one write, where chunks would
        // first wait a round trip for the receiver's Post. Behind another
        // one it is chunked, so that a stream of them stripes; a stream that
        // drains for a moment stays chunked (a lone one follows a lone one:
        // inline ones finish fast, so they would otherwise take the stream
        // over, onto one socket with two more copies). CUDA memory is then
        // staged whole on this thread (256 KiB one at a time GPU to GPU: 0.50x
        // host TCP chunked, 1.00-1.10x inline); memory that a NIC sends by
        // devmem TX stays on the data sockets, sent from its DMA-BUF.
        let large = len > cfg.inline_threshold;
        let alone = large && core.large_inflight.load(Ordering::Acquire) == 0;
        let follows_alone = large && core.last_large_alone.swap(alone, Ordering::AcqRel);
        let inline = !large
            || (len <= core.lone_inline && !mr.inner.any_devmem_tx() && alone && follows_alone);
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
                    let lane = Lane::caller();
                    let src = mr.inner.source(lane, offset as u64, len)?;
                    // SAFETY: TxPath hands out `len` readable bytes; `mr` holds the region for this call.
                    let body = unsafe { bytes(src, len) };
                    c.reqs.insert(
                        token,
                        Pending {
                            state: state.clone(),
                            chunked: None,
                            seq: None,
                        },
                    );
                    let queued = c.side.send_inline(token, tag, body, &mut ev);
                    // The bytes were copied, or will never be: staging may be reused.
                    mr.inner.sent(lane, offset as u64, len);
                    queued?;
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
                            seq: None,
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
        if large {
            core.large_inflight.fetch_add(1, Ordering::AcqRel);
        }
        let owner = Owner::Send {
            core: core.clone(),
            large,
        };
        Ok(Some(Request::new(state, owner)))
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
                c.stream.close(CLOSE_PATIENCE);
            },
            |_| {},
        );
        core.base.close_data();
    }
}

impl SendCore {
    /// A finished or dropped request frees its slot.
    pub(super) fn release(&self, large: bool) {
        if large {
            self.large_inflight.fetch_sub(1, Ordering::AcqRel);
        }
        self.base.release_slot();
    }

    pub(super) fn nudge(&self) {
        self.ctrl.nudge(|c| self.progress(c, true));
    }

    /// Drops what the control socket showed already (before a sleep on it).
    pub(super) fn settle(&self) {
        self.ctrl.with(
            |c| c.stream.settle(c.side.inbox_space()),
            |c| self.progress(c, true),
        );
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
        let failure = self.link.failure.get().cloned();
        // A peer's Bye explains its data sockets' EOF: read before failing.
        let read = read || failure.is_some();
        let mut gone = None;
        loop {
            if read && c.side.broken().is_none() {
                loop {
                    match c.stream.read(c.side.inbox_space()) {
                        Ok(Some(r)) => {
                            c.side.received(r.n, now, &mut |e| events.push(e));
                            if !r.more {
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
            gone = gone.or_else(|| self.retirements(c, now));
            while c.side.broken().is_none() && !c.side.output().is_empty() {
                match c.stream.write(c.side.output()) {
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
        // The retirement of the last data socket is written; then the comm fails.
        if let Some(e) = gone {
            c.side.fail(e);
        }
        if let Some(e) = c.side.broken().cloned() {
            for (_, p) in c.reqs.drain() {
                p.state.fail(e.clone());
            }
            self.link.sched().clear();
            self.base.close_data();
            return;
        }
        if c.dials.pending() {
            let as_link: Arc<dyn CommLink> = self.link.clone();
            for (index, gen) in c.dials.poll(&self.base, &as_link, now) {
                self.link.sched().revive(index, gen, now);
            }
        }
        // A retired socket may be invited back at any time; a socket the
        // peer closed waits for what the control socket says.
        let expect = c.side.moves_on_peer()
            || self.base.live() < self.base.n_data()
            || !c.retired.is_empty();
        if expect {
            c.stream.settle(c.side.inbox_space());
        }
        self.base.arm(expect, !c.side.output().is_empty());
        let due = if c.dials.pending() {
            Some(now)
        } else {
            let grace = c.retired.iter().map(|(_, at)| *at).min();
            [c.side.due(), grace].into_iter().flatten().min()
        };
        self.base.set_due(due);
    }

    /// Acts on data sockets the scheduler took out: closes them, tells the
    /// receiver, logs; the error to fail the comm with once none is left.
    /// A socket the peer closed waits `PEER_END_GRACE` first, the control
    /// socket read meanwhile: the end of a peer that closes its comm (its
    /// Bye) or dies is no socket failure.
    fn retirements(&self, c: &mut SendCtrl, now: Instant) -> Option<Error> {
        // A load first: the swap's write would cost on every progress.
        if self.link.retired.load(Ordering::Acquire)
            && self.link.retired.swap(false, Ordering::AcqRel)
        {
            for r in self.link.sched().take_retired() {
                let wait = matches!(r.why, Why::Failed(Error::ConnectionLost(_)));
                c.retired
                    .push((r, if wait { now + PEER_END_GRACE } else { now }));
            }
        }
        if c.retired.is_empty() {
            return None;
        }
        if self.base.closed.load(Ordering::Acquire) || c.side.broken().is_some() {
            c.retired.clear();
            return None;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut c.retired)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        c.retired = later;
        if due.is_empty() {
            return None;
        }
        let mut last = None;
        for (r, _) in due {
            let Some(nic) = self.base.retire(r.index, r.gen) else {
                continue;
            };
            self.count(&r);
            let name = &self.base.net.devices[nic].name;
            let why = match &r.why {
                Why::Stalled => "it stalled while others moved".to_string(),
                Why::Failed(e) => format!("{e}"),
            };
            let live = self.base.live();
            let msg = format!(
                "data socket {} on {name} taken out: {why}; {} chunks on their way go again, {live} socket(s) carry on",
                r.index, r.requeued
            );
            // The peer closing a socket is its own doing; a path that fails is news.
            match &r.why {
                Why::Failed(Error::ConnectionLost(_)) => tracing::info!(socket = r.index, "{msg}"),
                _ => tracing::warn!(socket = r.index, "{msg}"),
            }
            c.side.retire(r.index as u16, r.gen);
            last = Some(r.why);
        }
        self.base.kick();
        if self.base.live() > 0 || !c.retired.is_empty() {
            return None;
        }
        let sockets = self.base.n_data();
        Some(match last {
            Some(Why::Failed(Error::ConnectionLost(m))) => Error::ConnectionLost(format!(
                "every data socket was closed or reset by the peer (the last: {m})"
            )),
            Some(Why::Failed(e)) => Error::AllPathsLost {
                sockets,
                last: e.to_string(),
            },
            _ => Error::AllPathsLost {
                sockets,
                last: "stalled".into(),
            },
        })
    }

    fn count(&self, r: &Retired) {
        if let Some(s) = lock(&self.base.slots).get(r.index) {
            match r.why {
                Why::Stalled => s.counters.stalled(),
                Why::Failed(_) => s.counters.failed(),
            }
        }
    }

    fn act(&self, c: &mut SendCtrl, e: SendEvent) {
        match e {
            SendEvent::Written(t) => {
                if let Some(p) = c.reqs.remove(&t) {
                    p.state.piece_done();
                }
            }
            SendEvent::Acked(t) => {
                let Some(p) = c.reqs.remove(&t) else { return };
                if let Some(seq) = p.seq {
                    let done = self.link.sched().acked(seq);
                    if let Some(m) = done {
                        m.acked.store(true, Ordering::Release);
                    }
                }
                p.state.piece_done();
            }
            SendEvent::Refused { token, err } => {
                if let Some(p) = c.reqs.remove(&token) {
                    p.state.fail(err);
                }
            }
            SendEvent::Start { token, seq } => {
                let Some(p) = c.reqs.get_mut(&token) else {
                    return;
                };
                let Some(m) = p.chunked.take() else { return };
                p.seq = Some(seq);
                // The message's memory is a piece of the request: done
                // once no socket reads it any more.
                p.state.add_pieces(1);
                let copyable = !m.region.prefetches();
                let msg = Arc::new(TxMsg::new(
                    seq,
                    m.region,
                    m.offset,
                    m.len,
                    m.chunk_size,
                    p.state.clone(),
                ));
                let mut s = self.link.sched();
                s.start(seq, msg, m.len, m.chunk_size, copyable);
                // Sockets with nothing to do are woken.
                self.link.news(s);
            }
            SendEvent::Placed(p) => {
                let mut s = self.link.sched();
                let again = s.placed(p.seq, p.first, &p.bits);
                if again > 0 {
                    self.link.news(s);
                    tracing::debug!(seq = p.seq, "{again} chunks the receiver lacks go again");
                }
            }
            SendEvent::Dial(d) => {
                if self.base.net.cfg.reconnect.is_none() {
                    return;
                }
                match c.dials.invited(&self.base, &d, Instant::now()) {
                    Ok(()) => {}
                    Err(e @ Error::Protocol(_)) => c.side.fail(e),
                    Err(e) => tracing::debug!(socket = d.index, "cannot reconnect: {e}"),
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
