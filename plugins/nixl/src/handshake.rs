//! Links come up in two halves: the side that needs one connects and sends
//! `Hello`; the peer connects back and answers `HelloBack` on its own comm.
//! Each side's accept thread reads the first message of every comm it gets.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tcpx::{Handle, HostMemory, ListenComm, MemoryRegion, RecvComm};

use crate::error::{Error, Result};
use crate::inbox::{self, header_buf, Opener, NO_SLOT_BACKOFF};
use crate::outbox::Item;
use crate::proto::{Msg, MAX_MSG};
use crate::state::{lock, Inner, Link, SLICE};

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
    inbox::serve(&inner, comm, hdr, link, opener);
}

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
        m => Err(Error::Protocol(format!("expected Hello, got {}", m.kind()))),
    }
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
