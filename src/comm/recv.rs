//! The receiving end of a comm.

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use flowsteer::RuleHandle;

use super::redial::Offers;
use super::request::{Owner, Request, Waiter};
use super::{
    check_range, lock, Agreed, CommBase, Ctrl, CtrlRead, CtrlSocket, Mailbox, PEER_END_GRACE,
};
use crate::config::MAX_RECVS;
use crate::ctrl::{OwnMap, Params, RecvEvent, RecvSide, Token};
use crate::engine::{CommLink, Lookup, Placement, Poke, SockId};
use crate::error::{Error, Result};
use crate::memory::{Lane, MemoryRegion, Region, RxPath};
use crate::net::NetInner;
use crate::request::ReqState;
use crate::stats::SocketStats;

/// How long a closing comm lets its last control bytes reach the peer.
const CLOSE_PATIENCE: Duration = Duration::from_millis(200);

/// One buffer of a (grouped) receive.
#[derive(Debug, Clone, Copy)]
pub struct RecvBuf<'a> {
    pub mr: &'a MemoryRegion,
    pub offset: usize,
    pub len: usize,
    pub tag: i32,
}

struct Sub {
    region: Arc<Region>,
    offset: u64,
}

/// A posted receive whose buffers are not all resolved yet.
struct Group {
    state: Arc<ReqState>,
    /// A buffer's entry goes when a message fills it (or it is released).
    subs: Vec<Option<Sub>>,
}

pub(crate) struct RecvCtrl {
    stream: CtrlSocket,
    side: RecvSide,
    groups: OwnMap<Group>,
    next_token: Token,
    /// Invitations to reconnect retired sockets.
    offers: Offers,
    /// Data sockets (index, generation) in use that the peer ended.
    ended: HashSet<(usize, u32)>,
    /// The peer is gone and a data socket ended: when the others are given
    /// up on (see `PEER_END_GRACE`).
    cut_at: Option<Instant>,
    /// Data sockets that ended, judged at the given time.
    losses: Vec<(SockId, Error, Instant)>,
}

/// What a receive comm shares with its data sockets and placements.
pub(crate) struct RecvLink {
    core: Weak<RecvCore>,
    /// Accepted chunked messages not yet in place, by sequence number.
    placements: Mutex<HashMap<u64, Arc<Placement>>>,
    /// Messages below this number are announced (placed, refused or inline).
    announced: AtomicU64,
    /// A data socket waits for an announcement.
    waiting: AtomicBool,
    /// Which ones (data socket indices): only their workers are kicked.
    /// Not a `Mailbox`: the flag above stays SeqCst, as its pairing with
    /// `announced` needs, and a take that finds the list empty kicks all.
    waiters: Mutex<Vec<usize>>,
    /// Kicks so far (see `CommLink::kicks`).
    kicks: AtomicU64,
    /// Messages in place, to acknowledge.
    acks: Mailbox<u64>,
    /// Data sockets whose path failed, to log.
    losses: Mailbox<(SockId, Error)>,
    /// The first failure of the comm (a data socket's, or close).
    failure: OnceLock<Error>,
    /// The sender said Bye or closed its control socket (and when): data
    /// that did not arrive will not; placements fail with this.
    peer_gone: OnceLock<(Error, Instant)>,
    /// How long a data socket may stay silent once the sender is gone.
    patience: Duration,
}

impl CommLink for RecvLink {
    fn failed(&self, e: Error) {
        let _ = self.failure.set(e);
        self.nudge();
    }

    /// The sender decides which sockets are out (it retires them, and
    /// re-sends what they lost): this end logs and counts, once the
    /// control socket had time to say whether the peer is gone.
    fn lost(&self, id: SockId, e: Error) {
        self.losses.push((id, e));
        self.nudge();
    }

    fn wake(&self) {
        if let Some(core) = self.core.upgrade() {
            core.base.kick();
        }
    }

    fn lookup(&self, seq: u64) -> Lookup {
        // Read before the map: a placement goes in before its message counts
        // as announced, so one announced by then is in the map unless it is
        // complete. Read after, the map could miss a placement inserted
        // meanwhile and a fresh chunk be dropped as a duplicate (its message
        // then never completed: 1 in ~5,000 one-at-a-time messages).
        let announced = self.announced.load(Ordering::Acquire);
        let gone = self.peer_gone.get().is_some();
        if let Some(p) = lock(&self.placements).get(&seq) {
            return Lookup::Place(p.clone());
        }
        // Once the sender is gone, nothing more is announced.
        if seq < announced || gone {
            Lookup::Discard
        } else {
            Lookup::Unknown
        }
    }

    fn wait_for(&self, _seq: u64, id: SockId) {
        lock(&self.waiters).push(id.index as usize);
        self.waiting.store(true, Ordering::SeqCst);
        self.nudge();
    }

    fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Acquire)
    }

    fn completed(&self, seq: u64) {
        lock(&self.placements).remove(&seq);
        self.acks.push(seq);
        self.nudge();
    }

    fn failure(&self) -> Error {
        if let Some((e, _)) = self.peer_gone.get() {
            return e.clone();
        }
        self.failure.get().cloned().unwrap_or(Error::Closed)
    }

    fn sender_gone(&self) -> Option<(Instant, Duration)> {
        self.peer_gone.get().map(|(_, at)| (*at, self.patience))
    }
}

impl RecvLink {
    fn nudge(&self) {
        if let Some(core) = self.core.upgrade() {
            core.nudge();
        }
    }
}

pub(crate) struct RecvCore {
    pub(super) base: CommBase,
    ctrl: Ctrl<RecvCtrl>,
    link: Arc<RecvLink>,
    /// Flow-steering rules of the data sockets; withdrawn on close.
    flows: Mutex<Vec<RuleHandle>>,
}

/// The receiving end of a connection (from `ListenComm::accept`).
pub struct RecvComm {
    core: Arc<RecvCore>,
}

impl std::fmt::Debug for RecvComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecvComm({} data sockets)", self.core.base.n_data())
    }
}

impl RecvComm {
    pub(crate) fn new(
        net: Arc<NetInner>,
        ctrl: TcpStream,
        data: Vec<(usize, TcpStream)>,
        flows: Vec<RuleHandle>,
        agreed: Agreed,
    ) -> Result<Self> {
        let params = Params {
            timeout: net.cfg.peer_timeout,
            peer_timeout: agreed.peer_timeout,
            inline_threshold: agreed.inline_threshold,
            inline_max: agreed.inline_max,
        };
        let watch = match net.watch_ctrl(&ctrl, data.first().map_or(0, |d| d.0)) {
            Ok(w) => w,
            Err(e) => {
                // Bounded against a hung daemon, as on close.
                crate::gpumemd::withdraw_all(flows);
                return Err(e);
            }
        };
        let n_data = data.len();
        let core = Arc::new_cyclic(move |me: &Weak<RecvCore>| {
            let link = Arc::new(RecvLink {
                core: me.clone(),
                placements: Mutex::new(HashMap::new()),
                announced: AtomicU64::new(0),
                waiting: AtomicBool::new(false),
                waiters: Mutex::new(Vec::new()),
                kicks: AtomicU64::new(0),
                acks: Mailbox::default(),
                losses: Mailbox::default(),
                failure: OnceLock::new(),
                peer_gone: OnceLock::new(),
                patience: net
                    .cfg
                    .stall_timeout
                    .or(net.cfg.peer_timeout)
                    .unwrap_or(crate::config::DEFAULT_STALL_TIMEOUT),
            });
            let as_link: Arc<dyn CommLink> = link.clone();
            let target: Weak<dyn Poke> = me.clone();
            watch.bind(target);
            RecvCore {
                base: CommBase::new(net.clone(), data, &as_link, true, watch, &ctrl),
                ctrl: Ctrl::new(RecvCtrl {
                    stream: CtrlSocket::new(ctrl, true),
                    side: RecvSide::new(params, Instant::now()),
                    groups: OwnMap::default(),
                    next_token: 0,
                    offers: Offers::new(n_data, net.cfg.reconnect),
                    ended: HashSet::new(),
                    cut_at: None,
                    losses: Vec::new(),
                }),
                link,
                flows: Mutex::new(flows),
            }
        });
        Ok(RecvComm { core })
    }

    pub fn data_sockets(&self) -> usize {
        self.core.base.n_data()
    }

    /// What each data socket did: bytes, chunks, dropped copies.
    pub fn socket_stats(&self) -> Vec<SocketStats> {
        self.core.base.stats()
    }

    /// Posts a receive of up to 8 buffers; each takes the next message whose tag matches it.
    /// `Ok(None)`: every request slot is busy.
    pub fn irecv(&self, bufs: &[RecvBuf<'_>]) -> Result<Option<Request>> {
        let core = &self.core;
        core.base.check_open()?;
        if bufs.is_empty() || bufs.len() > MAX_RECVS {
            return Err(Error::InvalidArgument(format!(
                "a receive takes 1..={MAX_RECVS} buffers, got {}",
                bufs.len()
            )));
        }
        for b in bufs {
            check_range(b.mr, b.offset, b.len)?;
        }
        if core.base.inflight.load(Ordering::Acquire) >= core.base.net.cfg.max_requests {
            return Ok(None);
        }
        let state =
            Arc::new(ReqState::new(bufs.len(), bufs.len()).with_waker(core.base.waker.clone()));
        let group = Group {
            state: state.clone(),
            subs: bufs
                .iter()
                .map(|b| {
                    Some(Sub {
                        region: b.mr.inner.clone(),
                        offset: b.offset as u64,
                    })
                })
                .collect(),
        };
        let mut specs = [(0u64, 0i32); MAX_RECVS];
        for (s, b) in specs.iter_mut().zip(bufs) {
            *s = (b.len as u64, b.tag);
        }
        let specs = &specs[..bufs.len()];
        core.ctrl.with(
            |c| -> Result<()> {
                let token = c.next_token;
                c.next_token += 1;
                c.groups.insert(token, group);
                let RecvCtrl { side, groups, .. } = &mut *c;
                let mut bad = None;
                let posted = side.post(token, specs, &mut |e| {
                    if let Err(err) = core.act(groups, e) {
                        bad.get_or_insert(err);
                    }
                });
                if let Err(e) = posted {
                    groups.remove(&token);
                    return Err(e);
                }
                if let Some(e) = bad {
                    side.fail(e);
                }
                // What already came is read by the next test of a request.
                core.progress_reading(c, false, false);
                Ok(())
            },
            |c| core.progress(c, false),
        )?;
        core.base.inflight.fetch_add(1, Ordering::AcqRel);
        Ok(Some(Request::new(state, Owner::Recv(core.clone()))))
    }

    /// Kept for callers of earlier releases: every comm is driven by the
    /// threads that poll or wait on it (and ticked by its worker), so there
    /// is nothing to take over.
    pub fn take_over_progress(&self) -> Result<()> {
        Ok(())
    }

    /// Sleeps until the request behind `w` moves or `timeout` passes,
    /// reading the control socket meanwhile (see [`Waiter::wait`]).
    pub fn wait_progress(&self, w: &Waiter, timeout: Duration) {
        w.wait(timeout)
    }

    /// Completes once received data is visible to the consumer. Host memory
    /// needs no flush, and CUDA (bounce) receives complete only after their
    /// host-to-device copies finished, so the request is done at once.
    pub fn iflush(&self, _bufs: &[RecvBuf<'_>]) -> Result<Option<Request>> {
        self.core.base.check_open()?;
        Ok(Some(Request::new(
            Arc::new(ReqState::new(0, 0)),
            Owner::None,
        )))
    }

    pub fn close(self) {}
}

impl Drop for RecvComm {
    fn drop(&mut self) {
        let core = &self.core;
        core.base.closed.store(true, Ordering::Release);
        core.ctrl.with(
            |c| {
                c.side.bye();
                core.progress(c, false);
                let _ = core.link.failure.set(Error::Closed);
                c.side.fail(Error::Closed);
                core.progress(c, false);
                c.stream.close(CLOSE_PATIENCE);
            },
            |_| {},
        );
        core.base.close_data();
        crate::gpumemd::withdraw_all(std::mem::take(&mut *lock(&core.flows)));
    }
}

impl RecvCore {
    pub(super) fn nudge(&self) {
        self.ctrl.nudge(|c| self.progress(c, false));
    }

    /// Drops what the control socket showed already (before a sleep on it).
    pub(super) fn settle(&self) {
        self.ctrl.with(
            |c| c.stream.settle(c.side.inbox_space()),
            |c| self.progress(c, false),
        );
    }

    pub(super) fn drive(&self) {
        self.ctrl
            .with(|c| self.progress(c, false), |c| self.progress(c, false));
    }

    /// Moves bytes both ways and acts on what the protocol says: inline
    /// messages are copied into their buffers here, chunked ones become
    /// placements for the data sockets. `tick`: the periodic call.
    fn progress(&self, c: &mut RecvCtrl, tick: bool) {
        self.progress_reading(c, tick, true);
    }

    /// `progress`; `read`: also read the control socket (a post needs no
    /// answer now, and a read that finds nothing costs a system call on
    /// the way to the caller's next send).
    fn progress_reading(&self, c: &mut RecvCtrl, tick: bool, read: bool) {
        let now = Instant::now();
        let link = &self.link;
        let before = link.announced.load(Ordering::Acquire);
        let RecvCtrl {
            stream,
            side,
            groups,
            offers,
            ended,
            cut_at,
            losses,
            ..
        } = &mut *c;
        for seq in link.acks.take() {
            side.placed(seq);
        }
        let mut retired = Vec::new();
        while read && side.broken().is_none() {
            let CtrlRead { n, more } = match stream.read(side.inbox_space()) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    side.fail(e);
                    break;
                }
            };
            let mut bad = None;
            side.received(n, now, &mut |e| {
                if let RecvEvent::Retire { index, generation } = e {
                    retired.push((index as usize, generation));
                } else if let Err(err) = self.act(groups, e) {
                    bad.get_or_insert(err);
                }
            });
            if let Some(e) = bad {
                side.fail(e);
            }
            link.announced.store(side.announced(), Ordering::Release);
            if !more {
                break;
            }
        }
        // After the reads: a peer's Bye explains the data sockets' EOF.
        if let Some(e) = side.peer_gone() {
            link.peer_gone.get_or_init(|| (e.clone(), now));
        }
        if !retired.is_empty() {
            if let Err(e) = self.retire(side, offers, ended, &retired, now) {
                side.fail(e);
            }
        }
        if side.broken().is_none() && !offers.idle() {
            let as_link: Arc<dyn CommLink> = link.clone();
            offers.poll(&self.base, &as_link, now, &mut |d| side.dial(d));
        }
        // A data socket's end is judged once the control socket had time
        // to say the peer is gone (then it is no path's failure).
        losses.extend(
            link.losses
                .take()
                .into_iter()
                .map(|(id, e)| (id, e, now + PEER_END_GRACE)),
        );
        let gone = side.peer_gone().is_some();
        if !losses.is_empty() {
            let (judged, later): (Vec<_>, Vec<_>) = std::mem::take(losses)
                .into_iter()
                .partition(|(_, _, at)| gone || *at <= now);
            *losses = later;
            for (id, e, _) in judged {
                if side.broken().is_none() && self.note_loss(id, &e, gone) {
                    ended.insert((id.index as usize, id.gen));
                }
            }
        }
        let mut draining = None;
        if let Some(e) = link.failure.get().cloned() {
            if side.peer_gone().is_some() {
                self.cut_data();
            } else {
                side.fail(e);
            }
        } else if side.peer_gone().is_some() && !ended.is_empty() {
            // The sender is gone and its data sockets end: none re-sends
            // what they still owe. Once all ended (or the grace is over),
            // that fails; what came inline can still be received.
            let at = *cut_at.get_or_insert(now + PEER_END_GRACE);
            let all = self.base.live_ids().iter().all(|k| ended.contains(k));
            if all || now >= at {
                self.cut_data();
            } else {
                draining = Some(at);
            }
        }
        side.poll(now, tick);
        while side.broken().is_none() && !side.output().is_empty() {
            match stream.write(side.output()) {
                Ok(0) => break,
                Ok(n) => side.wrote(n, now),
                Err(e) => side.fail(e),
            }
        }
        if let Some(e) = side.broken().cloned() {
            self.fail_all(c, e);
            return;
        }
        if link.announced.load(Ordering::Acquire) != before
            && link.waiting.swap(false, Ordering::SeqCst)
        {
            link.kicks.fetch_add(1, Ordering::AcqRel);
            let waiters = std::mem::take(&mut *lock(&link.waiters));
            // Empty when a racing take got them: then everyone looks again.
            if waiters.is_empty() {
                self.base.kick();
            } else {
                self.base.kick_slots(&waiters);
            }
        }
        let expect =
            link.waiting.load(Ordering::SeqCst) || draining.is_some() || !c.losses.is_empty();
        if expect {
            c.stream.settle(c.side.inbox_space());
        }
        self.base.arm(expect, !c.side.output().is_empty());
        let judge = c.losses.iter().map(|l| l.2).min();
        let due = [c.side.due(now), c.offers.due(now), draining, judge]
            .into_iter()
            .flatten()
            .min();
        self.base.set_due(due);
    }

    /// The data sockets went with the peer: what they still owed fails.
    fn cut_data(&self) {
        self.base.close_data();
        let gone = std::mem::take(&mut *lock(&self.link.placements));
        drop(gone);
    }

    /// Counts and logs the end of a data socket in use (`gone`: with the
    /// peer, no path's failure); false if it was out already.
    fn note_loss(&self, id: SockId, e: &Error, gone: bool) -> bool {
        let slots = lock(&self.base.slots);
        let Some(s) = slots.get(id.index as usize) else {
            return false;
        };
        if s.gen != id.gen || !s.live {
            return false;
        }
        if gone {
            tracing::debug!(
                socket = id.index,
                "data socket {} ended with the peer: {e}",
                id.index
            );
        } else {
            s.counters.failed();
            tracing::info!(
                socket = id.index,
                "data socket {} lost: {e}; the sender re-sends its chunks on the others",
                id.index
            );
        }
        true
    }

    /// The sender took data sockets out: closes our ends (a chunk cut short
    /// there may come again on another socket) and tells the sender which
    /// chunks of each message in flight are in place, so it re-sends the
    /// rest; when none is left, the comm fails.
    fn retire(
        &self,
        side: &mut RecvSide,
        offers: &mut Offers,
        ended: &mut HashSet<(usize, u32)>,
        retired: &[(usize, u32)],
        now: Instant,
    ) -> Result<()> {
        let n = self.base.n_data();
        for &(index, gen) in retired {
            if index >= n {
                return Err(Error::Protocol(format!(
                    "data socket {index} retired, of {n}"
                )));
            }
            ended.remove(&(index, gen));
            if let Some(nic) = self.base.retire(index, gen) {
                tracing::info!(
                    socket = index,
                    nic = %self.base.net.devices[nic].name,
                    "the sender took data socket {index} out"
                );
                offers.retired(index, now);
            }
        }
        let placements: Vec<Arc<Placement>> =
            lock(&self.link.placements).values().cloned().collect();
        for p in placements {
            side.report(p.seq, &p.placed_bits());
        }
        if self.base.live() == 0 {
            return Err(Error::AllPathsLost {
                sockets: n,
                last: "the sender took the last one out".into(),
            });
        }
        Ok(())
    }

    /// Fails every request of a broken comm. Placements fail as the data
    /// sockets, closed now, let go of them.
    fn fail_all(&self, c: &mut RecvCtrl, e: Error) {
        let _ = self.link.failure.set(e.clone());
        for (_, g) in c.groups.drain() {
            for _ in g.subs.into_iter().flatten() {
                g.state.fail(e.clone());
            }
        }
        self.base.close_data();
        let gone = std::mem::take(&mut *lock(&self.link.placements));
        drop(gone);
    }

    /// Carries out one protocol event.
    fn act(&self, groups: &mut OwnMap<Group>, e: RecvEvent<'_>) -> Result<()> {
        let token = match &e {
            RecvEvent::Deliver { token, .. }
            | RecvEvent::Place { token, .. }
            | RecvEvent::Refused { token, .. } => *token,
            RecvEvent::Retire { .. } => return Ok(()),
        };
        let Some(g) = groups.get_mut(&token) else {
            return Ok(());
        };
        let mut outcome = Ok(());
        match e {
            RecvEvent::Deliver { buf, payload, .. } => {
                if let Some(sub) = g.subs.get_mut(buf).and_then(Option::take) {
                    g.state.set_size(buf, payload.len() as u64);
                    match deliver(&sub, payload) {
                        Ok(()) => {
                            drop(sub);
                            g.state.piece_done();
                        }
                        Err(err) => {
                            drop(sub);
                            g.state.fail(err.clone());
                            outcome = Err(err);
                        }
                    }
                }
            }
            RecvEvent::Place { buf, msg, .. } => {
                if let Some(sub) = g.subs.get_mut(buf).and_then(Option::take) {
                    g.state.set_size(buf, msg.size);
                    let link: Arc<dyn CommLink> = self.link.clone();
                    let p = Placement::new(
                        msg.seq,
                        sub.region,
                        sub.offset,
                        msg.size,
                        msg.chunk_size as u64,
                        g.state.clone(),
                        link,
                    );
                    lock(&self.link.placements).insert(msg.seq, Arc::new(p));
                }
            }
            RecvEvent::Refused { err, bufs, .. } => {
                for b in bufs {
                    if g.subs.get_mut(b).and_then(Option::take).is_some() {
                        g.state.fail(err.clone());
                    }
                }
            }
            RecvEvent::Retire { .. } => {}
        }
        if g.subs.iter().all(Option::is_none) {
            groups.remove(&token);
        }
        outcome
    }
}

/// Copies an inline message into its buffer and waits until it is there.
fn deliver(sub: &Sub, payload: &[u8]) -> Result<()> {
    let len = payload.len();
    if len == 0 {
        return Ok(());
    }
    let lane = Lane::caller();
    let dst = sub.region.sink(lane, sub.offset, len)?;
    // SAFETY: the sink is valid for `len` bytes and only this receive writes it.
    unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), dst, len) };
    sub.region.landed(lane, sub.offset, len)?;
    sub.region.settle()
}

impl Poke for RecvCore {
    fn poke(&self) {
        self.base.poked();
        self.nudge();
    }

    fn tick(&self) {
        if self.base.tick_due() {
            self.ctrl
                .try_with(|c| self.progress(c, true), |c| self.progress(c, false));
        }
    }
}
