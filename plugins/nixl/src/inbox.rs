//! What arrives on a peer's comm to us: a state machine ([`Inbox`]) that
//! any thread advances without blocking. The caller's transfer checks and
//! notification polls advance it as they poll, and a receiver thread (or the
//! polling thread) whenever the transport reports progress, so a passive
//! engine is still served.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tcpx::{HostMemory, MemoryRegion, RecvBuf, RecvComm, Request, Sizes, Waiter};

use crate::error::{status, Error, Result};
use crate::options::Progress;
use crate::outbox::{payloads, Item};
use crate::pack::{self, Dir, PackBuf, Piece};
use crate::proto::{Desc, Msg, MAX_MSG, TAG_DATA, TAG_HDR};
use crate::registry::Mem;
use crate::state::{lock, Inner, Link, Serve, SLICE};

/// Receives posted ahead of the data (tcpx allows 8 buffers per receive).
const RECVS_AHEAD: usize = 4;
/// Largest payload drained (received and dropped) from a refused WRITE;
/// a peer announcing more is cut off instead.
const MAX_DRAIN: u64 = 1 << 30;
/// A comm whose callers poll it in a loop (their last two polls at most
/// this far apart, the last one within it) is left to the callers. One
/// that polls now and then (a target napping between looks for
/// notifications) does not hold up what arrives meanwhile: a grace after
/// each of its polls left the comm unserved for that long every time (2 ms
/// made such a target answer each WRITE up to a millisecond late).
const CALLER_GRACE: Duration = Duration::from_micros(100);
/// How long a background thread naps while callers poll.
const NAP: Duration = Duration::from_micros(100);
/// How long the receiver thread backs off when no receive slot was free.
pub(crate) const NO_SLOT_BACKOFF: Duration = Duration::from_micros(200);

/// Where the thread that opened a link waits for it to come up.
pub(crate) type Opener = crossbeam_channel::Sender<Arc<Link>>;

/// The peer's comm to us and the state of what arrives on it.
pub(crate) struct Inbox {
    comm: RecvComm,
    /// Where answers go.
    link: Arc<Link>,
    st: Mutex<InState>,
    /// When callers polled this comm, in µs since `born`.
    polls: CallerPolls,
    born: Instant,
}

/// When callers last polled a comm, and how far apart their last two polls
/// were, in µs of some clock (0: never).
struct CallerPolls {
    at: AtomicU64,
    /// `u64::MAX`: fewer than two polls.
    gap: AtomicU64,
}

impl CallerPolls {
    fn new() -> Self {
        CallerPolls {
            at: AtomicU64::new(0),
            gap: AtomicU64::new(u64::MAX),
        }
    }

    fn polled(&self, now: u64) {
        let before = self.at.swap(now, Ordering::Relaxed);
        let gap = match before {
            0 => u64::MAX,
            b => now.saturating_sub(b),
        };
        self.gap.store(gap, Ordering::Relaxed);
    }

    /// Whether callers poll in a loop: the last poll and the gap before it
    /// both within `grace`.
    fn in_a_loop(&self, now: u64, grace: u64) -> bool {
        let t = self.at.load(Ordering::Relaxed);
        t != 0 && now.saturating_sub(t) < grace && self.gap.load(Ordering::Relaxed) < grace
    }
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
    /// One per payload message, in order.
    msgs: Vec<Sink>,
    /// Where drained payloads land (refused WRITEs).
    scratch: Option<MemoryRegion>,
    /// First message not yet posted.
    next: usize,
    /// Posted receives, oldest first, with the messages they cover.
    ahead: VecDeque<(Request, Range<usize>)>,
    /// What happens once every payload landed.
    then: Then,
}

/// Where one payload message goes.
enum Sink {
    /// Registered memory: one descriptor.
    Direct(Piece),
    /// Several descriptors: received into a pack buffer (taken when the
    /// receive is posted), then scattered to them.
    Pack(Vec<Piece>, Option<PackBuf>),
    /// A refused WRITE's payload of this many bytes, received and dropped.
    Drain(usize),
}

impl Sink {
    fn want(&self) -> usize {
        match self {
            Sink::Direct((_, _, len)) | Sink::Drain(len) => *len,
            Sink::Pack(pieces, _) => pieces.iter().map(|p| p.2).sum(),
        }
    }
}

impl Payloads {
    /// The step that lands `msgs`, then does `then`.
    fn step(msgs: Vec<Sink>, scratch: Option<MemoryRegion>, then: Then) -> Step {
        Step::Payloads(Payloads {
            msgs,
            scratch,
            next: 0,
            ahead: VecDeque::new(),
            then,
        })
    }

    /// Takes pack buffers for messages `from..to` until one is missing;
    /// returns the end of the run that has what it needs.
    fn ready(&mut self, inner: &Inner, from: usize, to: usize) -> Result<usize> {
        for i in from..to {
            if let Sink::Pack(pieces, buf @ None) = &mut self.msgs[i] {
                match inner.packs.take(&inner.net, Dir::Recv, pieces)? {
                    Some(mut b) => {
                        b.expect(pieces)?;
                        *buf = Some(b);
                    }
                    None => return Ok(i),
                }
            }
        }
        Ok(to)
    }

    fn bufs(&self, r: Range<usize>) -> Result<Vec<RecvBuf<'_>>> {
        self.msgs[r]
            .iter()
            .map(|m| {
                let (mr, offset, len) = match m {
                    Sink::Direct((reg, off, len)) => (&reg.mr, *off, *len),
                    Sink::Pack(_, Some(b)) => (b.mr().ok_or(Error::SinkFailed)?, 0, b.len()),
                    Sink::Pack(_, None) => return Err(Error::SinkFailed),
                    Sink::Drain(len) => (self.scratch.as_ref().ok_or(Error::SinkFailed)?, 0, *len),
                };
                Ok(RecvBuf {
                    mr,
                    offset,
                    len,
                    tag: TAG_DATA,
                })
            })
            .collect()
    }

    /// Scatters the packs of messages `r`, which have landed, and gives
    /// their buffers back.
    fn unpack(&mut self, r: Range<usize>) -> Result<()> {
        for m in &mut self.msgs[r] {
            if let Sink::Pack(pieces, buf) = m {
                if let Some(mut b) = buf.take() {
                    b.scatter(pieces)?;
                }
            }
        }
        Ok(())
    }
}

/// The payload messages of descriptors `pieces` sent by `layout`.
fn sinks(pieces: Vec<Piece>, layout: &[u32]) -> Vec<Sink> {
    pack::split(pieces, layout)
        .map(|run| match run {
            pack::Run::One(p) => Sink::Direct(p),
            pack::Run::Pack(ps) => Sink::Pack(ps, None),
        })
        .collect()
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

impl Serve for Inbox {
    fn help(&self, inner: &Inner) {
        self.polls.polled(self.now_us());
        self.try_pump(inner);
    }

    fn try_pump(&self, inner: &Inner) {
        if let Ok(mut st) = self.st.try_lock() {
            self.pump(inner, &mut st);
        }
    }

    /// The background threads leave a comm that callers poll in a loop to
    /// them (on a small machine their wake-ups would compete for the CPU).
    fn helped_recently(&self) -> bool {
        self.polls
            .in_a_loop(self.now_us(), CALLER_GRACE.as_micros() as u64)
    }

    fn link(&self) -> &Arc<Link> {
        &self.link
    }
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

    fn now_us(&self) -> u64 {
        self.born.elapsed().as_micros() as u64 + 1
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
                    while p.ahead.len() < RECVS_AHEAD && p.next < p.msgs.len() {
                        let end = (p.next + tcpx::ffi::TCPX_MAX_RECVS).min(p.msgs.len());
                        // A pack waits for a free pack buffer.
                        let end = p.ready(inner, p.next, end)?;
                        if end == p.next {
                            break;
                        }
                        match self.comm.irecv(&p.bufs(p.next..end)?)? {
                            Some(r) => {
                                p.ahead.push_back((r, p.next..end));
                                p.next = end;
                            }
                            None => break,
                        }
                    }
                    let Some((r, range)) = p.ahead.front_mut() else {
                        if p.next < p.msgs.len() {
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
                            let range = range.clone();
                            check_sizes(&sizes, &p.msgs, range.clone())?;
                            p.ahead.pop_front();
                            p.unpack(range)?;
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
        Ok(match msg {
            Msg::Write {
                id,
                mem,
                descs,
                layout,
                notif,
            } => match check_access(inner, peer, mem, &descs) {
                Ok(targets) => {
                    Payloads::step(sinks(targets, &layout), None, Then::Written { id, notif })
                }
                Err(text) => {
                    let (msgs, scratch) = drain_sinks(inner, &descs, &layout)?;
                    Payloads::step(msgs, Some(scratch), Then::Refused { id, text })
                }
            },
            Msg::Read {
                id,
                mem,
                descs,
                layout,
            } => {
                let unit = match check_access(inner, peer, mem, &descs) {
                    Ok(sources) => {
                        let ok = Msg::ReadResp {
                            id,
                            status: status::SUCCESS,
                            text: String::new(),
                        };
                        let mut unit = vec![Item::Msg(ok.encode())];
                        unit.extend(payloads(sources, &layout));
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
                    .get_mut(&id)
                    .ok_or_else(|| Error::Protocol(format!("ReadResp for unknown request {id}")))?;
                if status == status::SUCCESS {
                    // The batch stays pending until its data landed, so a
                    // broken link fails it.
                    // Taken: nothing else reads them, and a failure needs only the batch.
                    let msgs = sinks(std::mem::take(&mut p.sinks), &p.layout);
                    Payloads::step(msgs, None, Then::ReadDone { id })
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
                    m.kind()
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

/// Serves a peer's comm to us once its handshake bound it to `link`:
/// announces the link to the thread that opened it (`opener`), then reads
/// on this thread, or leaves the comm to the polling thread.
pub(crate) fn serve(
    inner: &Arc<Inner>,
    comm: RecvComm,
    hdr: MemoryRegion,
    link: Arc<Link>,
    opener: Option<Opener>,
) {
    let inbox = Arc::new(Inbox {
        comm,
        link: link.clone(),
        st: Mutex::new(InState {
            hdr,
            step: Step::Idle,
        }),
        polls: CallerPolls::new(),
        born: Instant::now(),
    });
    if let Err(e) = inbox.comm.take_over_progress() {
        link.broke(inner, e.into());
        return;
    }
    let served: Arc<dyn Serve> = inbox.clone();
    // Bound before the opener learns of the link, so its first poll helps.
    link.bind(served.clone());
    if let Some(tx) = opener {
        let _ = tx.send(link.clone());
    }
    if let Progress::Polling { .. } = inner.opts.progress {
        lock(&inner.polled).push(served);
        return;
    }
    while !link.stopped(inner) {
        let next = inbox.pump(inner, &mut lock(&inbox.st));
        match next {
            _ if inbox.helped_recently() => std::thread::sleep(NAP),
            Next::Wait(w) => inbox.comm.wait_progress(&w, SLICE),
            Next::Retry => std::thread::sleep(NO_SLOT_BACKOFF),
            Next::Dead => break,
        }
    }
    link.unbind(&served);
}

/// `Progress::Polling`: serves every peer's comm in turn, without sleeping
/// while there is one that no caller polls.
pub(crate) fn poll_loop(inner: Arc<Inner>, delay: Duration) {
    while !inner.stop.load(Ordering::Acquire) {
        let inboxes: Vec<Arc<dyn Serve>> = lock(&inner.polled).clone();
        let mut served = false;
        let mut gone = false;
        for inbox in &inboxes {
            if inbox.link().stopped(&inner) {
                gone = true;
            } else if !inbox.helped_recently() {
                served = true;
                inbox.try_pump(&inner);
            }
        }
        if gone {
            lock(&inner.polled).retain(|i| {
                let keep = !i.link().stopped(&inner);
                if !keep {
                    i.link().unbind(i);
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
        inbox.link().unbind(&inbox);
    }
}

/// Every range must lie inside one registration of kind `mem`; the text
/// says which did not (sent back to the initiator).
fn check_access(
    inner: &Inner,
    peer: &str,
    mem: u32,
    descs: &[Desc],
) -> std::result::Result<Vec<Piece>, String> {
    let refuse = |text: String| {
        tracing::warn!("tcpx-nixl: refused an access by {peer:?}: {text}");
        text
    };
    let kind = Mem::from_nixl(mem).map_err(|e| refuse(e.to_string()))?;
    let reg = lock(&inner.reg);
    let mut out: Vec<Piece> = Vec::with_capacity(descs.len());
    for d in descs {
        // A transfer's descriptors mostly lie in one region: try the last
        // one's before searching them all (found under this same lock).
        let last = out.last().and_then(|(r, _, _)| {
            r.offset_of(d.addr, d.len)
                .map(|off| (r.clone(), off))
                .filter(|_| r.kind == kind)
        });
        let (r, off) = last
            .or_else(|| reg.covering(d.addr, d.len, kind))
            .ok_or_else(|| {
                refuse(format!(
                    "{kind} range {:#x}+{} is not inside a registration of agent {:?}",
                    d.addr, d.len, inner.agent
                ))
            })?;
        out.push((r, off, d.len as usize));
    }
    Ok(out)
}

/// Where a refused WRITE's payload messages (by `layout`) are received and
/// dropped: one scratch buffer as large as the largest, if that is small
/// enough to drain.
fn drain_sinks(inner: &Inner, descs: &[Desc], layout: &[u32]) -> Result<(Vec<Sink>, MemoryRegion)> {
    let mut lens = Vec::with_capacity(layout.len());
    let mut it = descs.iter();
    for &k in layout {
        lens.push(it.by_ref().take(k as usize).map(|d| d.len).sum::<u64>());
    }
    let max = lens.iter().copied().max().unwrap_or(0);
    if max > MAX_DRAIN {
        return Err(Error::Protocol(format!(
            "refused WRITE announces a {max}-byte payload; closing the link instead of draining it"
        )));
    }
    let scratch = inner.net.reg_mr(HostMemory::zeroed(max as usize)?);
    Ok((
        lens.into_iter().map(|l| Sink::Drain(l as usize)).collect(),
        scratch,
    ))
}

/// The receive a protocol message lands in.
pub(crate) fn header_buf(hdr: &MemoryRegion) -> RecvBuf<'_> {
    RecvBuf {
        mr: hdr,
        offset: 0,
        len: MAX_MSG,
        tag: TAG_HDR,
    }
}

fn check_sizes(sizes: &Sizes, msgs: &[Sink], range: Range<usize>) -> Result<()> {
    for (got, i) in sizes.iter().zip(range) {
        let want = msgs[i].want();
        if *got != want as u64 {
            return Err(Error::Protocol(format!(
                "payload of {got} bytes where {want} were announced"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_callers_polling_in_a_loop_keep_the_background_away() {
        let p = CallerPolls::new();
        assert!(!p.in_a_loop(1000, 100));
        // One poll, or polls 500 µs apart (a napping target): served.
        p.polled(1000);
        assert!(!p.in_a_loop(1010, 100));
        p.polled(1500);
        assert!(!p.in_a_loop(1510, 100));
        // Polls 5 µs apart: left to the caller until it stops for the grace.
        p.polled(1505);
        assert!(p.in_a_loop(1510, 100));
        assert!(!p.in_a_loop(1605, 100));
    }
}
