//! Links: the two comms between this engine and one peer, and the threads
//! that move the protocol's messages over them.
//!
//! The sender thread owns the outgoing `SendComm` and posts each unit of
//! items (a header and its payloads) back to back, so units never
//! interleave on the wire. The receiver thread owns the incoming `RecvComm`,
//! posts receives in exactly the order the protocol announces messages, and
//! serves requests (as target) and responses (as initiator).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use tcpx::{
    Handle, HostMemory, ListenComm, MemoryRegion, RecvBuf, RecvComm, Request, SendComm, Sizes,
};

use crate::engine::{lock, Inner};
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

/// Something for the sender thread to put on the wire.
pub enum Item {
    /// A protocol message (tag `TAG_HDR`).
    Msg(Vec<u8>),
    /// A payload from registered memory: region, offset, length (tag `TAG_DATA`).
    Data(Arc<LocalRegion>, usize, usize),
}

/// The two comms with one peer.
pub struct Link {
    pub peer: String,
    tx: Mutex<Option<Sender<Vec<Item>>>>,
    broken: Mutex<Option<Error>>,
    closed: AtomicBool,
}

impl Link {
    /// Wraps an outgoing comm and starts its sender thread.
    fn start(inner: &Arc<Inner>, peer: &str, comm: SendComm) -> Arc<Link> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let link = Arc::new(Link {
            peer: peer.to_string(),
            tx: Mutex::new(Some(tx)),
            broken: Mutex::new(None),
            closed: AtomicBool::new(false),
        });
        let (i, l) = (inner.clone(), link.clone());
        inner.spawn(format!("tcpx-nixl-tx-{peer}"), move || {
            if let Err(e) = send_loop(&i, &l, comm, rx) {
                l.broke(&i, e);
            }
        });
        link
    }

    /// Queues one unit; its items leave in order, unseparated.
    pub fn send(&self, unit: Vec<Item>) -> Result<()> {
        if let Some(e) = lock(&self.broken).clone() {
            return Err(e);
        }
        let lost = || Error::PeerLost {
            peer: self.peer.clone(),
            why: "link closed".into(),
        };
        match &*lock(&self.tx) {
            Some(tx) => tx.send(unit).map_err(|_| lost()),
            None => Err(lost()),
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.tx).take();
    }

    fn stopped(&self, inner: &Inner) -> bool {
        self.closed.load(Ordering::Acquire) || inner.stop.load(Ordering::Acquire)
    }

    /// Records the first failure, forgets the link and fails its transfers.
    fn broke(self: &Arc<Self>, inner: &Inner, e: Error) {
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
            if links.get(&self.peer).is_some_and(|l| Arc::ptr_eq(l, self)) {
                links.remove(&self.peer);
            }
        }
        inner.fail_peer(&self.peer, &e);
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
    let link = Link::start(inner, agent, comm);
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

// ------------------------------------------------------------------ sender

struct InFlight {
    req: Request,
    _hdr: Option<MemoryRegion>,
}

fn send_loop(inner: &Inner, link: &Link, comm: SendComm, rx: Receiver<Vec<Item>>) -> Result<()> {
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    // Messages that travel inline are copied out during isend, so one
    // buffer serves them all (a fresh mapping per message cost more than
    // the send).
    let inline = inner.net.config().inline_threshold.min(MAX_MSG);
    let mut scratch = inner.net.reg_mr(HostMemory::zeroed(inline)?);
    loop {
        let unit = if inflight.is_empty() {
            match rx.recv_timeout(SLICE) {
                Ok(u) => Some(u),
                Err(RecvTimeoutError::Timeout) if !link.stopped(inner) => None,
                Err(_) => return Ok(()),
            }
        } else {
            match rx.try_recv() {
                Ok(u) => Some(u),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return Ok(()),
            }
        };
        match unit {
            Some(items) => {
                for it in items {
                    post_send(inner, &comm, &mut inflight, &mut scratch, it)?;
                }
            }
            None => reap(&mut inflight, true)?,
        }
    }
}

fn post_send(
    inner: &Inner,
    comm: &SendComm,
    inflight: &mut VecDeque<InFlight>,
    scratch: &mut MemoryRegion,
    it: Item,
) -> Result<()> {
    let (hdr, region) = match it {
        Item::Msg(bytes) if !bytes.is_empty() && bytes.len() <= scratch.len() => {
            // No request holds the scratch region: inline sends copy at once.
            scratch.bytes_mut()?[..bytes.len()].copy_from_slice(&bytes);
            loop {
                match comm.isend(scratch, 0, bytes.len(), TAG_HDR)? {
                    Some(req) => {
                        inflight.push_back(InFlight { req, _hdr: None });
                        return Ok(());
                    }
                    None => reap(inflight, true)?,
                }
            }
        }
        Item::Msg(bytes) => (
            Some(inner.net.reg_mr(HostMemory::from_slice(&bytes)?)),
            None,
        ),
        Item::Data(r, off, len) => (None, Some((r, off, len))),
    };
    loop {
        let posted = match (&hdr, &region) {
            (Some(mr), _) => comm.isend(mr, 0, mr.len(), TAG_HDR)?,
            (None, Some((r, off, len))) => comm.isend(&r.mr, *off, *len, TAG_DATA)?,
            (None, None) => return Ok(()),
        };
        match posted {
            Some(req) => {
                inflight.push_back(InFlight { req, _hdr: hdr });
                return Ok(());
            }
            // Every request slot is busy: finish some first.
            None => reap(inflight, true)?,
        }
    }
}

/// Drops finished sends (in any order); with `block`, waits briefly for the
/// oldest when none finished.
fn reap(inflight: &mut VecDeque<InFlight>, block: bool) -> Result<()> {
    let before = inflight.len();
    let mut i = 0;
    while i < inflight.len() {
        if inflight[i].req.test()?.is_some() {
            inflight.remove(i);
        } else {
            i += 1;
        }
    }
    if block && inflight.len() == before {
        if let Some(f) = inflight.front_mut() {
            match f.req.wait(Duration::from_micros(500)) {
                Ok(_) => {
                    inflight.pop_front();
                }
                Err(tcpx::Error::Timeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- receiver

fn receive_loop(inner: Arc<Inner>, comm: RecvComm) {
    let mut hdr = match HostMemory::zeroed(MAX_MSG) {
        Ok(m) => inner.net.reg_mr(m),
        Err(e) => {
            tracing::error!("tcpx-nixl: no memory for a receive buffer: {e}");
            return;
        }
    };
    let stop = || inner.stop.load(Ordering::Acquire);
    let link = match handshake(&inner, &comm, &mut hdr, &stop) {
        Ok(l) => l,
        Err(e) => {
            if !stop() {
                tracing::warn!("tcpx-nixl: dropped an incoming connection: {e}");
            }
            return;
        }
    };
    let stopped = || link.stopped(&inner);
    if let Err(e) = serve(&inner, &link, &comm, &mut hdr, &stopped) {
        link.broke(&inner, e);
    }
}

/// Reads the first message: a peer's `Hello` (we connect back) or the
/// `HelloBack` completing a link we opened.
fn handshake(
    inner: &Arc<Inner>,
    comm: &RecvComm,
    hdr: &mut MemoryRegion,
    stop: &dyn Fn() -> bool,
) -> Result<Arc<Link>> {
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
            let link = Link::start(inner, &agent, back);
            let ack = Msg::HelloBack {
                pair,
                agent: inner.agent.clone(),
            };
            link.send(vec![Item::Msg(ack.encode())])?;
            lock(&inner.links)
                .entry(agent)
                .or_insert_with(|| link.clone());
            Ok(link)
        }
        Msg::HelloBack { pair, .. } => {
            let (link, tx) = lock(&inner.pairs)
                .remove(&pair)
                .ok_or_else(|| Error::Protocol(format!("HelloBack for unknown pair {pair:#x}")))?;
            let _ = tx.send(link.clone());
            Ok(link)
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

fn serve(
    inner: &Inner,
    link: &Arc<Link>,
    comm: &RecvComm,
    hdr: &mut MemoryRegion,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let peer = &link.peer;
    loop {
        match recv_msg(comm, hdr, stop)? {
            Msg::Write {
                id,
                mem,
                descs,
                notif,
            } => match check_access(inner, peer, mem, &descs) {
                Ok(targets) => {
                    recv_into(comm, &targets, stop)?;
                    // Queued only now: the data is in place.
                    if let Some(n) = notif {
                        lock(&inner.notifs).push((peer.clone(), n));
                    }
                    let done = Msg::WriteDone {
                        id,
                        status: status::SUCCESS,
                        text: String::new(),
                    };
                    link.send(vec![Item::Msg(done.encode())])?;
                }
                Err(text) => {
                    drain(inner, comm, &descs, stop)?;
                    let done = Msg::WriteDone {
                        id,
                        status: status::ERR_NOT_ALLOWED,
                        text,
                    };
                    link.send(vec![Item::Msg(done.encode())])?;
                }
            },
            Msg::Read { id, mem, descs } => match check_access(inner, peer, mem, &descs) {
                Ok(sources) => {
                    let ok = Msg::ReadResp {
                        id,
                        status: status::SUCCESS,
                        text: String::new(),
                    };
                    let mut unit = vec![Item::Msg(ok.encode())];
                    unit.extend(sources.into_iter().map(|(r, o, l)| Item::Data(r, o, l)));
                    link.send(unit)?;
                }
                Err(text) => {
                    let no = Msg::ReadResp {
                        id,
                        status: status::ERR_NOT_ALLOWED,
                        text,
                    };
                    link.send(vec![Item::Msg(no.encode())])?;
                }
            },
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
            }
            Msg::ReadResp { id, status, text } => {
                let p = lock(&inner.pending)
                    .remove(&id)
                    .ok_or_else(|| Error::Protocol(format!("ReadResp for unknown request {id}")))?;
                if status == status::SUCCESS {
                    if let Err(e) = recv_into(comm, &p.sinks, stop) {
                        p.xfer.fail(e.clone());
                        return Err(e);
                    }
                    p.xfer.batch_done();
                } else {
                    p.xfer.fail(Error::Refused {
                        peer: peer.clone(),
                        text,
                    });
                }
            }
            Msg::Notif { msg } => lock(&inner.notifs).push((peer.clone(), msg)),
            m => {
                return Err(Error::Protocol(format!(
                    "unexpected {} on an open link",
                    kind_name(&m)
                )))
            }
        }
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

fn wait(req: &mut Request, stop: &dyn Fn() -> bool) -> Result<Sizes> {
    loop {
        match req.wait(SLICE) {
            Ok(s) => return Ok(s),
            Err(tcpx::Error::Timeout { .. }) if !stop() => {}
            Err(tcpx::Error::Timeout { .. }) => return Err(Error::ShuttingDown),
            Err(e) => return Err(e.into()),
        }
    }
}

fn recv_msg(comm: &RecvComm, hdr: &mut MemoryRegion, stop: &dyn Fn() -> bool) -> Result<Msg> {
    let size = {
        let buf = RecvBuf {
            mr: hdr,
            offset: 0,
            len: MAX_MSG,
            tag: TAG_HDR,
        };
        let mut req = post_recv(comm, &[buf], stop)?;
        wait(&mut req, stop)?[0] as usize
    };
    Msg::decode(&hdr.bytes()?[..size])
}

/// Posts a receive, waiting while every slot is busy.
fn post_recv(comm: &RecvComm, bufs: &[RecvBuf<'_>], stop: &dyn Fn() -> bool) -> Result<Request> {
    loop {
        if let Some(r) = comm.irecv(bufs)? {
            return Ok(r);
        }
        if stop() {
            return Err(Error::ShuttingDown);
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Receives one payload per target, in order, each exactly its length.
fn recv_into(
    comm: &RecvComm,
    targets: &[(Arc<LocalRegion>, usize, usize)],
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let groups: Vec<Vec<RecvBuf<'_>>> = targets
        .chunks(tcpx::ffi::TCPX_MAX_RECVS)
        .map(|g| {
            g.iter()
                .map(|(r, off, len)| RecvBuf {
                    mr: &r.mr,
                    offset: *off,
                    len: *len,
                    tag: TAG_DATA,
                })
                .collect()
        })
        .collect();
    run_groups(comm, &groups, stop)
}

fn run_groups(comm: &RecvComm, groups: &[Vec<RecvBuf<'_>>], stop: &dyn Fn() -> bool) -> Result<()> {
    let mut ahead: VecDeque<(Request, &[RecvBuf<'_>])> = VecDeque::new();
    let mut next = groups.iter();
    loop {
        while ahead.len() < RECVS_AHEAD {
            let Some(g) = next.next() else { break };
            ahead.push_back((post_recv(comm, g, stop)?, g));
        }
        let Some((mut req, g)) = ahead.pop_front() else {
            return Ok(());
        };
        let sizes = wait(&mut req, stop)?;
        for (got, b) in sizes.iter().zip(g.iter()) {
            if *got != b.len as u64 {
                return Err(Error::Protocol(format!(
                    "payload of {got} bytes where {} were announced",
                    b.len
                )));
            }
        }
    }
}

/// Receives and drops the payloads of a refused WRITE, keeping the stream in step.
fn drain(inner: &Inner, comm: &RecvComm, descs: &[Desc], stop: &dyn Fn() -> bool) -> Result<()> {
    let max = descs.iter().map(|d| d.len).max().unwrap_or(0);
    if max > MAX_DRAIN {
        return Err(Error::Protocol(format!(
            "refused WRITE announces a {max}-byte payload; closing the link instead of draining it"
        )));
    }
    let scratch = inner.net.reg_mr(HostMemory::zeroed(max as usize)?);
    let groups: Vec<Vec<RecvBuf<'_>>> = descs
        .chunks(tcpx::ffi::TCPX_MAX_RECVS)
        .map(|g| {
            g.iter()
                .map(|d| RecvBuf {
                    mr: &scratch,
                    offset: 0,
                    len: d.len as usize,
                    tag: TAG_DATA,
                })
                .collect()
        })
        .collect();
    run_groups(comm, &groups, stop)
}
