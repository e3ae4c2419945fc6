//! The state the engine's threads share: the engine-wide [`Inner`], a
//! [`Link`] per peer (its outbox, its flusher thread, whether it broke) and
//! the transfers in flight. What arrives is served by `inbox.rs`, reached
//! here only through [`Serve`].
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use tcpx::{Net, SendComm, HANDLE_SIZE};

use crate::error::{Error, Result};
use crate::options::Options;
use crate::outbox::{Item, Outbox};
use crate::pack::{Packs, Piece};
use crate::proto::Msg;
use crate::registry::Registry;

/// How often blocked threads look at the stop flags.
pub const SLICE: Duration = Duration::from_millis(100);
/// How long the flusher naps when its next pack waits for a buffer that
/// another link's send holds.
const PACK_BACKOFF: Duration = Duration::from_micros(200);

/// What the link and the polling thread need of a peer's comm to us.
pub(crate) trait Serve: Send + Sync {
    /// A polling caller's turn: advances unless another thread is at it.
    fn help(&self, inner: &Inner);
    /// Advances unless another thread is at it.
    fn try_pump(&self, inner: &Inner);
    /// Whether a caller polled it lately (background threads then leave it be).
    fn helped_recently(&self) -> bool;
    /// The link its answers go out on.
    fn link(&self) -> &Arc<Link>;
}

/// Progress of one posted transfer; shared with the link threads.
pub struct XferState {
    /// Polled for the answers.
    link: Arc<Link>,
    batches: AtomicUsize,
    failed: Mutex<Option<Error>>,
    /// READ with a notification: sent to the target after the last batch lands.
    notif_after: Mutex<Option<(Arc<Link>, Vec<u8>)>>,
}

impl XferState {
    /// A transfer of `batches` batches (at least one) whose answers come over `link`.
    pub(crate) fn new(link: Arc<Link>, batches: usize) -> Self {
        XferState {
            link,
            batches: AtomicUsize::new(batches.max(1)),
            failed: Mutex::new(None),
            notif_after: Mutex::new(None),
        }
    }

    /// A READ's notification, sent over `link` once the last batch landed.
    pub(crate) fn notify_after(&self, link: Arc<Link>, msg: Vec<u8>) {
        *lock(&self.notif_after) = Some((link, msg));
    }

    pub fn fail(&self, e: Error) {
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some(e);
        }
    }

    /// Marks one batch done; the last one sends a pending READ notification.
    pub(crate) fn batch_done(&self) {
        if self.batches.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some((link, msg)) = lock(&self.notif_after).take() {
                if let Err(e) = link.send(vec![Item::Msg(Msg::Notif { msg }.encode())]) {
                    self.fail(e);
                }
            }
        }
    }

    /// `Ok(true)` once every batch completed. Reads what the peer sent
    /// meanwhile, so a polling caller sees its answer without a thread hand-off.
    pub fn check(&self) -> Result<bool> {
        if self.batches.load(Ordering::Acquire) != 0 {
            self.link.help();
        }
        if let Some(e) = lock(&self.failed).clone() {
            return Err(e);
        }
        let done = self.batches.load(Ordering::Acquire) == 0;
        if !done {
            // A polling caller must not starve the threads that move its data.
            std::thread::yield_now();
        }
        Ok(done)
    }
}

/// A batch the initiator waits on, keyed by request id.
pub(crate) struct Pending {
    pub peer: String,
    pub xfer: Arc<XferState>,
    /// READ: where the response payloads land, in order, and how they travel.
    pub sinks: Vec<Piece>,
    pub layout: Vec<u32>,
}

/// A link we opened and the channel its connect waits on.
pub(crate) type OpenPair = (Arc<Link>, crossbeam_channel::Sender<Arc<Link>>);

pub(crate) struct Inner {
    /// Declared first: its workers stop before the pack buffers they may
    /// still use are freed.
    pub net: Net,
    pub agent: String,
    pub opts: Options,
    pub handle: [u8; HANDLE_SIZE],
    pub reg: Mutex<Registry>,
    pub peer_info: Mutex<HashMap<String, [u8; HANDLE_SIZE]>>,
    pub links: Mutex<HashMap<String, Arc<Link>>>,
    /// Serializes connection setup so concurrent posts open one link.
    pub connecting: Mutex<()>,
    /// Links we opened, waiting for the peer's HelloBack.
    pub pairs: Mutex<HashMap<u64, OpenPair>>,
    pub pending: Mutex<HashMap<u64, Pending>>,
    /// Peers' comms served by the polling progress thread (`Progress::Polling`).
    pub polled: Mutex<Vec<Arc<dyn Serve>>>,
    pub notifs: Mutex<Vec<(String, Vec<u8>)>>,
    pub stop: AtomicBool,
    pub next_id: AtomicU64,
    pub threads: Mutex<Vec<JoinHandle<()>>>,
    /// Buffers that packed descriptors cross the wire in.
    pub packs: Arc<Packs>,
}

impl Inner {
    pub fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Fails every batch waiting on `peer` (its link broke).
    pub fn fail_peer(&self, peer: &str, e: &Error) {
        let mut p = lock(&self.pending);
        p.retain(|_, b| {
            if b.peer == peer {
                b.xfer.fail(e.clone());
                false
            } else {
                true
            }
        });
    }

    pub fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) {
        match std::thread::Builder::new().name(name).spawn(f) {
            Ok(h) => lock(&self.threads).push(h),
            Err(e) => tracing::error!("tcpx-nixl: cannot start a thread: {e}"),
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder left consistent data (no invariants span a panic here).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The two comms with one peer.
pub(crate) struct Link {
    pub peer: String,
    inner: Weak<Inner>,
    /// `None` once closed.
    out: Mutex<Option<Outbox>>,
    /// Wakes the flusher: a backlog formed or large sends are in flight.
    kick: Condvar,
    broken: Mutex<Option<Error>>,
    closed: AtomicBool,
    /// The peer's comm to us, once bound; pollers advance it.
    inbox: Mutex<Option<Arc<dyn Serve>>>,
}

impl Link {
    /// Wraps an outgoing comm and starts its flusher thread.
    pub fn start(inner: &Arc<Inner>, peer: &str, comm: SendComm) -> Result<Arc<Link>> {
        let link = Arc::new(Link {
            peer: peer.to_string(),
            inner: Arc::downgrade(inner),
            out: Mutex::new(Some(Outbox::new(&inner.net, comm, inner.packs.clone())?)),
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
        ob.queue(unit);
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

    pub fn stopped(&self, inner: &Inner) -> bool {
        self.closed.load(Ordering::Acquire) || inner.stop.load(Ordering::Acquire)
    }

    /// Binds the peer's comm to us (which `help` then advances).
    pub fn bind(&self, inbox: Arc<dyn Serve>) {
        *lock(&self.inbox) = Some(inbox);
    }

    /// Forgets `inbox` if it is the one bound (the link would otherwise keep it open).
    pub fn unbind(&self, inbox: &Arc<dyn Serve>) {
        let mut bound = lock(&self.inbox);
        if bound.as_ref().is_some_and(|b| Arc::ptr_eq(b, inbox)) {
            bound.take();
        }
    }

    /// Records the first failure, forgets the link and fails its transfers.
    pub fn broke(&self, inner: &Inner, e: Error) {
        // A peer that closed on purpose (its agent went away) is no failure to warn about.
        let closed = matches!(e, Error::Transport(tcpx::Error::PeerClosed));
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
        if closed {
            tracing::debug!("tcpx-nixl: {:?} closed its link", self.peer);
        } else if !inner.stop.load(Ordering::Acquire) && e != Error::ShuttingDown {
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
        let oldest = ob.oldest();
        // Sleep outside the lock, so callers keep posting meanwhile.
        drop(out);
        match oldest {
            Some(w) => w.wait(Duration::from_millis(1)),
            // Waiting for pack buffers that other links' sends hold.
            None => std::thread::sleep(PACK_BACKOFF),
        }
        out = lock(&link.out);
    }
}
