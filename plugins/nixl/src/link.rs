//! Links: the two comms between this engine and one peer.
//!
//! A small transfer must not hop between threads, so nothing here waits for
//! another thread to do its work:
//! - Sends are posted by the thread that makes them (the caller posting a
//!   transfer, or the thread answering a request). A per-link flusher thread
//!   only takes over items that found every request slot busy, and reaps
//!   large sends.
//! - What arrives on the peer's comm is handled by a state machine
//!   ([`Inbox`]) that any thread advances without blocking: the caller's
//!   transfer checks and notification polls advance it as they poll, and a
//!   receiver thread advances it whenever the transport reports progress,
//!   so a passive engine is still served.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use tcpx::{
    Handle, HostMemory, ListenComm, MemoryRegion, Net, RecvBuf, RecvComm, Request, SendComm, Sizes,
    Waiter,
};

use crate::engine::{lock, Inner, Progress};
use crate::error::{status, Error, Result};
use crate::proto::{Desc, Msg, MAX_MSG, TAG_DATA, TAG_HDR};
use crate::registry::{LocalRegion, Mem};

/// How often blocked threads look at the stop flags.
const SLICE: Duration = Duration::from_millis(100);
/// Receives posted ahead of the data (tcpx allows 8 buffers per receive).
const RECVS_AHEAD: usize = 4;
/// Largest payload drained (received and dropped) from a refused WRITE;
/// a peer announcing more is cut off instead.
const MAX_DRAIN: u64 = 1 << 30;
/// A comm a caller polled within this long is left to the callers.
const CALLER_GRACE: Duration = Duration::from_millis(2);
/// How long a background thread naps while callers poll.
const NAP: Duration = Duration::from_millis(1);
/// How long the receiver thread backs off when no receive slot was free.
const NO_SLOT_BACKOFF: Duration = Duration::from_micros(200);

/// Something to put on the wire.
pub enum Item {
    /// A protocol message (tag `TAG_HDR`).
    Msg(Vec<u8>),
    /// A payload from registered memory: region, offset, length (tag `TAG_DATA`).
    Data(Arc<LocalRegion>, usize, usize),
}

// ------------------------------------------------------------------ sending

struct InFlight {
    req: Request,
    _hdr: Option<MemoryRegion>,
}

/// The outgoing comm and what is queued on it.
struct Outbox {
    comm: SendComm,
    inflight: VecDeque<InFlight>,
    /// Messages that travel inline are copied out during isend, so one
    /// buffer serves them all (a fresh mapping per message cost more than
    /// the send).
    scratch: MemoryRegion,
    /// Items that found every request slot busy, in order; nothing newer
    /// is posted before them, so units never interleave on the wire.
    backlog: VecDeque<Item>,
}

impl Outbox {
    /// Posts the backlog until a slot is missing, and drops finished sends
    /// (inline ones finish as they are posted).
    fn advance(&mut self, net: &Net) -> Result<()> {
        while let Some(it) = self.backlog.pop_front() {
            // Small items of one go leave in one system call.
            let more = !self.backlog.is_empty();
            let Some(it) = self.post(net, it, more)? else {
                continue;
            };
            // Finished sends hold their slots until reaped.
            let before = self.inflight.len();
            self.reap()?;
            self.backlog.push_front(it);
            if self.inflight.len() == before {
                break;
            }
        }
        self.reap()
    }

    /// Nothing queued and nothing in flight.
    fn idle(&self) -> bool {
        self.backlog.is_empty() && self.inflight.is_empty()
    }

    /// Posts one item (`more`: another follows at once); hands it back
    /// when every request slot is busy.
    fn post(&mut self, net: &Net, it: Item, more: bool) -> Result<Option<Item>> {
        let send = |comm: &SendComm, mr: &MemoryRegion, off, len, tag| {
            if more {
                comm.isend_more(mr, off, len, tag)
            } else {
                comm.isend(mr, off, len, tag)
            }
        };
        let posted = match &it {
            Item::Msg(b) if b.len() <= self.scratch.len() => {
                // No request holds the scratch region: inline sends copy at once.
                self.scratch.bytes_mut()?[..b.len()].copy_from_slice(b);
                send(&self.comm, &self.scratch, 0, b.len(), TAG_HDR)?
                    .map(|req| InFlight { req, _hdr: None })
            }
            Item::Msg(b) => {
                let mr = net.reg_mr(HostMemory::from_slice(b)?);
                send(&self.comm, &mr, 0, mr.len(), TAG_HDR)?.map(|req| InFlight {
                    req,
                    _hdr: Some(mr),
                })
            }
            Item::Data(r, off, len) => send(&self.comm, &r.mr, *off, *len, TAG_DATA)?
                .map(|req| InFlight { req, _hdr: None }),
        };
        Ok(match posted {
            Some(f) => {
                self.inflight.push_back(f);
                None
            }
            None => Some(it),
        })
    }

    /// Drops finished sends, in any order.
    fn reap(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.inflight.len() {
            if self.inflight[i].req.test()?.is_some() {
                self.inflight.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }
}

/// The two comms with one peer.
pub struct Link {
    pub peer: String,
    inner: Weak<Inner>,
    /// `None` once closed.
    out: Mutex<Option<Outbox>>,
    /// Wakes the flusher: a backlog formed or large sends are in flight.
    kick: Condvar,
    broken: Mutex<Option<Error>>,
    closed: AtomicBool,
    /// The peer's comm to us, once bound; pollers advance it.
    inbox: Mutex<Option<Arc<Inbox>>>,
}

impl Link {
    /// Wraps an outgoing comm and starts its flusher thread.
    fn start(inner: &Arc<Inner>, peer: &str, comm: SendComm) -> Result<Arc<Link>> {
        let inline = inner.net.config().inline_threshold.min(MAX_MSG);
        let scratch = inner.net.reg_mr(HostMemory::zeroed(inline)?);
        let link = Arc::new(Link {
            peer: peer.to_string(),
            inner: Arc::downgrade(inner),
            out: Mutex::new(Some(Outbox {
                comm,
                inflight: VecDeque::new(),
                scratch,
                backlog: VecDeque::new(),
            })),
            kick: Condvar::new(),
            broken: Mutex::new(None),
            closed: AtomicBool::new(false),
            inbox: Mutex::new(None),
        });
        let (i, l) = (inner.clone(), link.clone());
        inner.spawn(format!("tcpx-nixl-tx-{peer}"), move || flush_loop(i, l));
        Ok(link)
    }

    fn lost(&self) -> Error {
        Error::PeerLost {
            peer: self.peer.clone(),
            why: "link closed".into(),
        }
    }

    /// Puts one unit on the wire from this thread; its items leave in
    /// order, unseparated. Never blocks on the network: what finds no free
    /// request slot is left to the flusher.
    pub fn send(&self, unit: Vec<Item>) -> Result<()> {
        if let Some(e) = lock(&self.broken).clone() {
            return Err(e);
        }
        let inner = self.inner.upgrade().ok_or(Error::ShuttingDown)?;
        let mut out = lock(&self.out);
        let ob = out.as_mut().ok_or_else(|| self.lost())?;
        ob.backlog.extend(unit);
        if let Err(e) = ob.advance(&inner.net) {
            drop(out);
            self.broke(&inner, e.clone());
            return Err(e);
        }
        if !ob.idle() {
            self.kick.notify_one();
        }
        Ok(())
    }

    /// Advances the peer's comm unless another thread is at it (for callers
    /// that poll: they see their answers without a thread hand-off).
    pub fn help(&self) {
        let Some(inbox) = lock(&self.inbox).clone() else {
            return;
        };
        if let Some(inner) = self.inner.upgrade() {
            inbox.help(&inner);
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.out).take();
        self.kick.notify_all();
        lock(&self.inbox).take();
    }

    fn stopped(&self, inner: &Inner) -> bool {
        self.closed.load(Ordering::Acquire) || inner.stop.load(Ordering::Acquire)
    }

    /// Records the first failure, forgets the link and fails its transfers.
    fn broke(&self, inner: &Inner, e: Error) {
        let e = match e {
            Error::Transport(t) => Error::PeerLost {
                peer: self.peer.clone(),
                why: t.to_string(),
            },
            e => e,
        };
        {
            let mut b = lock(&self.broken);
            if b.is_some() {
                return;
            }
            *b = Some(e.clone());
        }
        if !inner.stop.load(Ordering::Acquire) && e != Error::ShuttingDown {
            tracing::warn!("tcpx-nixl: link to {:?} failed: {e}", self.peer);
        }
        self.close();
        {
            let mut links = lock(&inner.links);
            if links
                .get(&self.peer)
                .is_some_and(|l| std::ptr::eq(Arc::as_ptr(l), self))
            {
                links.remove(&self.peer);
            }
        }
        inner.fail_peer(&self.peer, &e);
    }
}

/// Posts what callers left queued and reaps large sends; sleeps otherwise.
fn flush_loop(inner: Arc<Inner>, link: Arc<Link>) {
    let mut out = lock(&link.out);
    loop {
        if link.stopped(&inner) {
            return;
        }
        let Some(ob) = out.as_mut() else { return };
        if ob.idle() {
            out = link
                .kick
                .wait_timeout(out, SLICE)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        if let Err(e) = ob.advance(&inner.net) {
            drop(out);
            link.broke(&inner, e);
            return;
        }
        let oldest = ob.inflight.front().map(|f| f.req.waiter());
        // Sleep outside the lock, so callers keep posting meanwhile.
        drop(out);
        if let Some(w) = oldest {
            w.wait(Duration::from_millis(1));
        }
        out = lock(&link.out);
    }
}

/// The link to `agent`, opened now if there is none.
pub(crate) fn ensure(inner: &Arc<Inner>, agent: &str) -> Result<Arc<Link>> {
    if let Some(l) = lock(&inner.links).get(agent) {
        return Ok(l.clone());
    }
    let _one = lock(&inner.connecting);
    if let Some(l) = lock(&inner.links).get(agent) {
        return Ok(l.clone());
    }
    let h = *lock(&inner.peer_info)
        .get(agent)
        .ok_or_else(|| Error::UnknownPeer(agent.into()))?;
    let timeout = inner.opts.timeout;
    let mut handle = Handle::from_bytes(&h)?;
    let comm = inner
        .net
        .connect_wait(0, &mut handle, timeout)
        .map_err(|e| Error::PeerLost {
            peer: agent.into(),
            why: e.to_string(),
        })?;
    let link = Link::start(inner, agent, comm)?;
    let pair: u64 = rand::random();
    let (tx, rx) = crossbeam_channel::bounded(1);
    lock(&inner.pairs).insert(pair, (link.clone(), tx));
    let hello = Msg::Hello {
        pair,
        agent: inner.agent.clone(),
        handle: inner.handle.to_vec(),
    };
    let answered = link.send(vec![Item::Msg(hello.encode())]).and_then(|()| {
        rx.recv_timeout(timeout).map_err(|_| Error::Timeout {
            what: format!("waiting for {agent:?} to connect back"),
            after_ms: timeout.as_millis() as u64,
        })
    });
    lock(&inner.pairs).remove(&pair);
    if let Err(e) = answered {
        link.close();
        return Err(e);
    }
    lock(&inner.links).insert(agent.to_string(), link.clone());
    Ok(link)
}

pub(crate) fn accept_loop(inner: Arc<Inner>, mut listener: ListenComm) {
    while !inner.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok(Some(comm)) => {
                let i = inner.clone();
                inner.spawn("tcpx-nixl-rx".into(), move || receive_loop(i, comm));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => {
                tracing::warn!("tcpx-nixl: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------- receiving

/// The peer's comm to us and the state of what arrives on it.
pub(crate) struct Inbox {
    comm: RecvComm,
    /// Where answers go.
    link: Arc<Link>,
    st: Mutex<InState>,
    /// When a caller last polled this comm, in µs since `born` (0: never).
    helped_at: AtomicU64,
    born: Instant,
}

struct InState {
    /// Protocol messages land here.
    hdr: MemoryRegion,
    step: Step,
}

enum Step {
    /// Between messages; nothing posted.
    Idle,
    /// The next protocol message is awaited.
    Header(Request),
    /// Payloads announced by a message are landing.
    Payloads(Payloads),
    /// The link broke; nothing more is read.
    Dead,
}

struct Payloads {
    sinks: Sinks,
    /// First sink not yet posted.
    next: usize,
    /// Posted receives, oldest first, with the sinks they cover.
    ahead: VecDeque<(Request, Range<usize>)>,
    /// What happens once every payload landed.
    then: Then,
}

enum Sinks {
    /// Registered memory: region, offset, length.
    Regions(Vec<(Arc<LocalRegion>, usize, usize)>),
    /// A refused WRITE's payloads, each received into one scratch buffer and dropped.
    Drain(MemoryRegion, Vec<usize>),
}

impl Sinks {
    fn len(&self) -> usize {
        match self {
            Sinks::Regions(v) => v.len(),
            Sinks::Drain(_, v) => v.len(),
        }
    }

    fn want(&self, i: usize) -> usize {
        match self {
            Sinks::Regions(v) => v[i].2,
            Sinks::Drain(_, v) => v[i],
        }
    }

    fn bufs(&self, r: Range<usize>) -> Vec<RecvBuf<'_>> {
        match self {
            Sinks::Regions(v) => v[r]
                .iter()
                .map(|(reg, off, len)| RecvBuf {
                    mr: &reg.mr,
                    offset: *off,
                    len: *len,
                    tag: TAG_DATA,
                })
                .collect(),
            Sinks::Drain(scratch, v) => v[r]
                .iter()
                .map(|len| RecvBuf {
                    mr: scratch,
                    offset: 0,
                    len: *len,
                    tag: TAG_DATA,
                })
                .collect(),
        }
    }
}

enum Then {
    /// WRITE accepted: queue its notification (the data is in place), answer.
    Written { id: u64, notif: Option<Vec<u8>> },
    /// WRITE refused and drained: answer with the reason.
    Refused { id: u64, text: String },
    /// Our READ's data landed.
    ReadDone { id: u64 },
}

/// What a pump leaves the receiver thread to do.
enum Next {
    /// Sleep until this request moves (or a slice passes).
    Wait(Waiter),
    /// No receive slot was free; try again shortly.
    Retry,
    /// The link is gone.
    Dead,
}

impl Inbox {
    /// Advances as far as it can without blocking; a failure breaks the link.
    fn pump(&self, inner: &Inner, st: &mut InState) -> Next {
        match self.advance(inner, st) {
            Ok(next) => next,
            Err(e) => {
                st.step = Step::Dead;
                self.link.broke(inner, e);
                Next::Dead
            }
        }
    }

    /// Forgets this comm in its link (the link would otherwise keep it open).
    fn unbind(self: &Arc<Self>) {
        let mut bound = lock(&self.link.inbox);
        if bound.as_ref().is_some_and(|b| Arc::ptr_eq(b, self)) {
            bound.take();
        }
    }

    fn now_us(&self) -> u64 {
        self.born.elapsed().as_micros() as u64 + 1
    }

    /// Whether a caller polled this comm lately: the background threads
    /// leave it to the callers meanwhile (on a small machine their wake-ups
    /// would compete with the callers for the CPU).
    fn helped_recently(&self) -> bool {
        let t = self.helped_at.load(Ordering::Relaxed);
        t != 0 && self.now_us() - t < CALLER_GRACE.as_micros() as u64
    }

    /// A polling caller's turn: pumps unless another thread is at it.
    fn help(&self, inner: &Inner) {
        self.helped_at.store(self.now_us(), Ordering::Relaxed);
        self.try_pump(inner);
    }

    fn try_pump(&self, inner: &Inner) {
        if let Ok(mut st) = self.st.try_lock() {
            self.pump(inner, &mut st);
        }
    }

    fn advance(&self, inner: &Inner, st: &mut InState) -> Result<Next> {
        loop {
            match std::mem::replace(&mut st.step, Step::Idle) {
                Step::Dead => {
                    st.step = Step::Dead;
                    return Ok(Next::Dead);
                }
                Step::Idle => match self.comm.irecv(&[header_buf(&st.hdr)])? {
                    Some(r) => st.step = Step::Header(r),
                    None => return Ok(Next::Retry),
                },
                Step::Header(mut r) => {
                    // Taken before the test, so a completion in between still wakes it.
                    let w = r.waiter();
                    match r.test()? {
                        None => {
                            st.step = Step::Header(r);
                            return Ok(Next::Wait(w));
                        }
                        Some(sizes) => {
                            let msg = Msg::decode(&st.hdr.bytes()?[..sizes[0] as usize])?;
                            st.step = self.on_msg(inner, msg)?;
                        }
                    }
                }
                Step::Payloads(mut p) => {
                    while p.ahead.len() < RECVS_AHEAD && p.next < p.sinks.len() {
                        let end = (p.next + tcpx::ffi::TCPX_MAX_RECVS).min(p.sinks.len());
                        match self.comm.irecv(&p.sinks.bufs(p.next..end))? {
                            Some(r) => {
                                p.ahead.push_back((r, p.next..end));
                                p.next = end;
                            }
                            None => break,
                        }
                    }
                    let Some((r, range)) = p.ahead.front_mut() else {
                        if p.next < p.sinks.len() {
                            st.step = Step::Payloads(p);
                            return Ok(Next::Retry);
                        }
                        self.finish(inner, p.then)?;
                        continue;
                    };
                    let w = r.waiter();
                    match r.test()? {
                        None => {
                            st.step = Step::Payloads(p);
                            return Ok(Next::Wait(w));
                        }
                        Some(sizes) => {
                            check_sizes(&sizes, &p.sinks, range.clone())?;
                            p.ahead.pop_front();
                            st.step = Step::Payloads(p);
                        }
                    }
                }
            }
        }
    }

    /// Acts on one protocol message; returns what comes next on the comm.
    fn on_msg(&self, inner: &Inner, msg: Msg) -> Result<Step> {
        let peer = &self.link.peer;
        let payloads = |sinks, then| {
            Step::Payloads(Payloads {
                sinks,
                next: 0,
                ahead: VecDeque::new(),
                then,
            })
        };
        Ok(match msg {
            Msg::Write {
                id,
                mem,
                descs,
                notif,
            } => match check_access(inner, peer, mem, &descs) {
                Ok(targets) => payloads(Sinks::Regions(targets), Then::Written { id, notif }),
                Err(text) => payloads(drain_sinks(inner, &descs)?, Then::Refused { id, text }),
            },
            Msg::Read { id, mem, descs } => {
                let unit = match check_access(inner, peer, mem, &descs) {
                    Ok(sources) => {
                        let ok = Msg::ReadResp {
                            id,
                            status: status::SUCCESS,
                            text: String::new(),
                        };
                        let mut unit = vec![Item::Msg(ok.encode())];
                        unit.extend(sources.into_iter().map(|(r, o, l)| Item::Data(r, o, l)));
                        unit
                    }
                    Err(text) => {
                        let no = Msg::ReadResp {
                            id,
                            status: status::ERR_NOT_ALLOWED,
                            text,
                        };
                        vec![Item::Msg(no.encode())]
                    }
                };
                self.link.send(unit)?;
                Step::Idle
            }
            Msg::WriteDone { id, status, text } => {
                if let Some(p) = lock(&inner.pending).remove(&id) {
                    if status == status::SUCCESS {
                        p.xfer.batch_done();
                    } else {
                        p.xfer.fail(Error::Refused {
                            peer: peer.clone(),
                            text,
                        });
                    }
                }
                Step::Idle
            }
            Msg::ReadResp { id, status, text } => {
                let mut pending = lock(&inner.pending);
                let p = pending
                    .get(&id)
                    .ok_or_else(|| Error::Protocol(format!("ReadResp for unknown request {id}")))?;
                if status == status::SUCCESS {
                    // The batch stays pending until its data landed, so a
                    // broken link fails it.
                    payloads(Sinks::Regions(p.sinks.clone()), Then::ReadDone { id })
                } else {
                    if let Some(p) = pending.remove(&id) {
                        p.xfer.fail(Error::Refused {
                            peer: peer.clone(),
                            text,
                        });
                    }
                    Step::Idle
                }
            }
            Msg::Notif { msg } => {
                lock(&inner.notifs).push((peer.clone(), msg));
                Step::Idle
            }
            m => {
                return Err(Error::Protocol(format!(
                    "unexpected {} on an open link",
                    kind_name(&m)
                )))
            }
        })
    }

    fn finish(&self, inner: &Inner, then: Then) -> Result<()> {
        let (id, status, text) = match then {
            Then::Written { id, notif } => {
                // Queued only now: the data is in place.
                if let Some(n) = notif {
                    lock(&inner.notifs).push((self.link.peer.clone(), n));
                }
                (id, status::SUCCESS, String::new())
            }
            Then::Refused { id, text } => (id, status::ERR_NOT_ALLOWED, text),
            Then::ReadDone { id } => {
                if let Some(p) = lock(&inner.pending).remove(&id) {
                    p.xfer.batch_done();
                }
                return Ok(());
            }
        };
        let done = Msg::WriteDone { id, status, text };
        self.link.send(vec![Item::Msg(done.encode())])
    }
}

/// Serves one comm a peer opened to us: the handshake, then the inbox.
fn receive_loop(inner: Arc<Inner>, comm: RecvComm) {
    let mut hdr = match HostMemory::zeroed(MAX_MSG) {
        Ok(m) => inner.net.reg_mr(m),
        Err(e) => {
            tracing::error!("tcpx-nixl: no memory for a receive buffer: {e}");
            return;
        }
    };
    let stop = || inner.stop.load(Ordering::Acquire);
    let (link, opener) = match handshake(&inner, &comm, &mut hdr, &stop) {
        Ok(l) => l,
        Err(e) => {
            if !stop() {
                tracing::warn!("tcpx-nixl: dropped an incoming connection: {e}");
            }
            return;
        }
    };
    let inbox = Arc::new(Inbox {
        comm,
        link: link.clone(),
        st: Mutex::new(InState {
            hdr,
            step: Step::Idle,
        }),
        helped_at: AtomicU64::new(0),
        born: Instant::now(),
    });
    if let Err(e) = inbox.comm.take_over_progress() {
        link.broke(&inner, e.into());
        return;
    }
    // Bound before the opener learns of the link, so its first poll helps.
    *lock(&link.inbox) = Some(inbox.clone());
    if let Some(tx) = opener {
        let _ = tx.send(link.clone());
    }
    if let Progress::Polling { .. } = inner.opts.progress {
        lock(&inner.polled).push(inbox);
        return;
    }
    while !link.stopped(&inner) {
        let next = inbox.pump(&inner, &mut lock(&inbox.st));
        match next {
            _ if inbox.helped_recently() => std::thread::sleep(NAP),
            Next::Wait(w) => inbox.comm.wait_progress(&w, SLICE),
            Next::Retry => std::thread::sleep(NO_SLOT_BACKOFF),
            Next::Dead => break,
        }
    }
    inbox.unbind();
}

/// `Progress::Polling`: serves every peer's comm in turn, without sleeping
/// while there is one that no caller polls.
pub(crate) fn poll_loop(inner: Arc<Inner>, delay: Duration) {
    while !inner.stop.load(Ordering::Acquire) {
        let inboxes: Vec<Arc<Inbox>> = lock(&inner.polled).clone();
        let mut served = false;
        let mut gone = false;
        for inbox in &inboxes {
            if inbox.link.stopped(&inner) {
                gone = true;
            } else if !inbox.helped_recently() {
                served = true;
                inbox.try_pump(&inner);
            }
        }
        if gone {
            lock(&inner.polled).retain(|i| {
                let keep = !i.link.stopped(&inner);
                if !keep {
                    i.unbind();
                }
                keep
            });
        }
        if !served {
            // Nothing to serve, or callers poll it all.
            std::thread::sleep(NAP);
        } else if delay.is_zero() {
            std::thread::yield_now();
        } else {
            std::thread::sleep(delay);
        }
    }
    // A link and its bound comm hold each other; the engine is going.
    for inbox in lock(&inner.polled).drain(..) {
        inbox.unbind();
    }
}

/// Where the thread that opened a link waits for it to come up.
type Opener = crossbeam_channel::Sender<Arc<Link>>;

/// Reads the first message: a peer's `Hello` (we connect back) or the
/// `HelloBack` completing a link we opened (returned with the channel its
/// opener waits on).
fn handshake(
    inner: &Arc<Inner>,
    comm: &RecvComm,
    hdr: &mut MemoryRegion,
    stop: &dyn Fn() -> bool,
) -> Result<(Arc<Link>, Option<Opener>)> {
    match recv_msg(comm, hdr, stop)? {
        Msg::Hello {
            pair,
            agent,
            handle,
        } => {
            let mut h = Handle::from_bytes(&handle)?;
            let back = inner
                .net
                .connect_wait(0, &mut h, inner.opts.timeout)
                .map_err(|e| Error::PeerLost {
                    peer: agent.clone(),
                    why: format!("connecting back: {e}"),
                })?;
            let link = Link::start(inner, &agent, back)?;
            let ack = Msg::HelloBack {
                pair,
                agent: inner.agent.clone(),
            };
            link.send(vec![Item::Msg(ack.encode())])?;
            lock(&inner.links)
                .entry(agent)
                .or_insert_with(|| link.clone());
            Ok((link, None))
        }
        Msg::HelloBack { pair, .. } => {
            let (link, tx) = lock(&inner.pairs)
                .remove(&pair)
                .ok_or_else(|| Error::Protocol(format!("HelloBack for unknown pair {pair:#x}")))?;
            Ok((link, Some(tx)))
        }
        m => Err(Error::Protocol(format!(
            "expected Hello, got {}",
            kind_name(&m)
        ))),
    }
}

fn kind_name(m: &Msg) -> &'static str {
    match m {
        Msg::Hello { .. } => "Hello",
        Msg::HelloBack { .. } => "HelloBack",
        Msg::Write { .. } => "Write",
        Msg::WriteDone { .. } => "WriteDone",
        Msg::Read { .. } => "Read",
        Msg::ReadResp { .. } => "ReadResp",
        Msg::Notif { .. } => "Notif",
    }
}

/// Every range must lie inside one registration of kind `mem`; the text
/// says which did not (sent back to the initiator).
fn check_access(
    inner: &Inner,
    peer: &str,
    mem: u32,
    descs: &[Desc],
) -> std::result::Result<Vec<(Arc<LocalRegion>, usize, usize)>, String> {
    let refuse = |text: String| {
        tracing::warn!("tcpx-nixl: refused an access by {peer:?}: {text}");
        text
    };
    let kind = Mem::from_nixl(mem).map_err(|e| refuse(e.to_string()))?;
    let reg = lock(&inner.reg);
    descs
        .iter()
        .map(|d| {
            reg.covering(d.addr, d.len, kind)
                .map(|(r, off)| (r, off, d.len as usize))
                .ok_or_else(|| {
                    refuse(format!(
                        "{kind} range {:#x}+{} is not inside a registration of agent {:?}",
                        d.addr, d.len, inner.agent
                    ))
                })
        })
        .collect()
}

/// Where a refused WRITE's payloads are received and dropped: one scratch
/// buffer as large as the largest, if that is small enough to drain.
fn drain_sinks(inner: &Inner, descs: &[Desc]) -> Result<Sinks> {
    let max = descs.iter().map(|d| d.len).max().unwrap_or(0);
    if max > MAX_DRAIN {
        return Err(Error::Protocol(format!(
            "refused WRITE announces a {max}-byte payload; closing the link instead of draining it"
        )));
    }
    let scratch = inner.net.reg_mr(HostMemory::zeroed(max as usize)?);
    Ok(Sinks::Drain(
        scratch,
        descs.iter().map(|d| d.len as usize).collect(),
    ))
}

/// The receive a protocol message lands in.
fn header_buf(hdr: &MemoryRegion) -> RecvBuf<'_> {
    RecvBuf {
        mr: hdr,
        offset: 0,
        len: MAX_MSG,
        tag: TAG_HDR,
    }
}

fn check_sizes(sizes: &Sizes, sinks: &Sinks, range: Range<usize>) -> Result<()> {
    for (got, i) in sizes.iter().zip(range) {
        let want = sinks.want(i);
        if *got != want as u64 {
            return Err(Error::Protocol(format!(
                "payload of {got} bytes where {want} were announced"
            )));
        }
    }
    Ok(())
}

/// Blocking receive of one protocol message (the handshake only).
fn recv_msg(comm: &RecvComm, hdr: &mut MemoryRegion, stop: &dyn Fn() -> bool) -> Result<Msg> {
    let mut req = loop {
        if let Some(r) = comm.irecv(&[header_buf(hdr)])? {
            break r;
        }
        if stop() {
            return Err(Error::ShuttingDown);
        }
        std::thread::sleep(NO_SLOT_BACKOFF);
    };
    let size = loop {
        match req.wait(SLICE) {
            Ok(s) => break s[0] as usize,
            Err(tcpx::Error::Timeout { .. }) if !stop() => {}
            Err(tcpx::Error::Timeout { .. }) => return Err(Error::ShuttingDown),
            Err(e) => return Err(e.into()),
        }
    };
    Msg::decode(&hdr.bytes()?[..size])
}
