//! The one-sided engine: registrations, peers, transfers and notifications.
//!
//! Threads: one accept thread per engine; per link (a pair of comms with one
//! peer) a flusher for sends that found no free slot and a receiver thread
//! for a passive engine. Transfers are posted, and their answers read, by the
//! polling caller's own thread where it can (see inbox.rs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tcpx::{Handle, Net, HANDLE_SIZE};

use crate::error::{status, Error, Result};
use crate::handshake;
use crate::inbox;
use crate::options::{Options, Progress};
use crate::outbox::{payloads, Item};
use crate::pack::{self, Piece};
use crate::proto::{Desc, Msg, MAX_DESCS, MAX_NOTIF};
use crate::registry::{self, LocalRegion, Mem, Registry, RemoteRegion};
use crate::state::{lock, Inner, Pending, XferState};

/// Connection info: "TXCI", version u16, then the 128-byte listen handle.
const CONN_MAGIC: &[u8; 4] = b"TXCI";
const CONN_LEN: usize = 6 + HANDLE_SIZE;

/// WRITE or READ, as `nixl_xfer_op_t` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// One local/remote pair of a transfer.
#[derive(Debug, Clone, Copy)]
pub struct XferDesc {
    pub local_addr: u64,
    pub remote_addr: u64,
    pub len: u64,
    /// Local registration id.
    pub local_md: u64,
    /// Remote descriptor id (from `load_remote_md`).
    pub remote_md: u64,
}

/// The TCPX NIXL engine of one agent.
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the transport, listens, and serves peers on background threads.
    pub fn new(agent: &str, opts: Options) -> Result<Self> {
        crate::log::init();
        let net = Net::init(opts.cfg.clone())?;
        let (handle, listener) = net.listen(0)?;
        let inner = Arc::new(Inner {
            net,
            agent: agent.to_string(),
            opts,
            handle: handle.to_bytes(),
            reg: Mutex::new(Registry::default()),
            peer_info: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            connecting: Mutex::new(()),
            pairs: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            polled: Mutex::new(Vec::new()),
            notifs: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            packs: Default::default(),
        });
        let i = inner.clone();
        inner.spawn("tcpx-nixl-accept".into(), move || {
            handshake::accept_loop(i, listener)
        });
        if let Progress::Polling { delay } = inner.opts.progress {
            let i = inner.clone();
            inner.spawn("tcpx-nixl-poll".into(), move || inbox::poll_loop(i, delay));
        }
        Ok(Engine { inner })
    }

    pub fn agent(&self) -> &str {
        &self.inner.agent
    }

    /// This engine's connection info for peers.
    pub fn conn_info(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONN_LEN);
        v.extend_from_slice(CONN_MAGIC);
        v.extend_from_slice(&crate::proto::VERSION.to_le_bytes());
        v.extend_from_slice(&self.inner.handle);
        v
    }

    pub fn load_conn_info(&self, agent: &str, info: &[u8]) -> Result<()> {
        if info.len() != CONN_LEN || &info[..4] != CONN_MAGIC {
            return Err(Error::InvalidArgument(format!(
                "connection info of {agent:?} is not a TCPX one ({} bytes)",
                info.len()
            )));
        }
        let v = u16::from_le_bytes([info[4], info[5]]);
        if v != crate::proto::VERSION {
            return Err(Error::Protocol(format!(
                "{agent:?} speaks protocol version {v}, we speak {}",
                crate::proto::VERSION
            )));
        }
        let mut h = [0; HANDLE_SIZE];
        h.copy_from_slice(&info[6..]);
        Handle::from_bytes(&h)?;
        lock(&self.inner.peer_info).insert(agent.to_string(), h);
        Ok(())
    }

    /// Registers caller memory and returns its id.
    ///
    /// # Safety
    /// `addr..addr+len` must stay valid until `deregister` and until every
    /// transfer touching it completed.
    pub unsafe fn register(&self, addr: u64, len: u64, kind: Mem) -> Result<u64> {
        let id = self.inner.id();
        // SAFETY: forwarded to the caller's contract.
        unsafe { lock(&self.inner.reg).register(&self.inner.net, id, addr, len, kind)? };
        Ok(id)
    }

    pub fn deregister(&self, id: u64) -> Result<()> {
        lock(&self.inner.reg).deregister(id)
    }

    /// The public descriptor of registration `id` (loaded by peers with `load_remote_md`).
    pub fn public_data(&self, id: u64) -> Result<Vec<u8>> {
        let r = lock(&self.inner.reg).local(id)?;
        Ok(registry::encode_public(&r).to_vec())
    }

    pub fn load_remote_md(&self, agent: &str, blob: &[u8], kind: Mem) -> Result<u64> {
        let r = registry::decode_public(agent, blob)?;
        if r.kind != kind {
            return Err(Error::InvalidArgument(format!(
                "descriptor of {agent:?} is {} memory, loaded as {kind}",
                r.kind
            )));
        }
        let id = self.inner.id();
        lock(&self.inner.reg).load_remote(id, r);
        Ok(id)
    }

    pub fn unload_remote_md(&self, id: u64) -> Result<()> {
        lock(&self.inner.reg).unload_remote(id)
    }

    /// Opens the link to `agent` unless one is up.
    pub fn connect(&self, agent: &str) -> Result<()> {
        handshake::ensure(&self.inner, agent).map(drop)
    }

    /// Closes the link to `agent`; its in-flight transfers fail.
    pub fn disconnect(&self, agent: &str) -> Result<()> {
        if let Some(l) = lock(&self.inner.links).remove(agent) {
            l.close();
            self.inner.fail_peer(
                agent,
                &Error::PeerLost {
                    peer: agent.into(),
                    why: "disconnected locally".into(),
                },
            );
        }
        Ok(())
    }

    /// Posts a transfer; poll the result with [`XferState::check`].
    pub fn post(
        &self,
        op: Op,
        agent: &str,
        descs: &[XferDesc],
        notif: Option<&[u8]>,
    ) -> Result<Arc<XferState>> {
        self.post_prepared(&self.prepare(op, agent, descs.iter().copied())?, notif)
    }

    /// Resolves and checks a transfer once (NIXL's prepXfer) for any number
    /// of posts: neighbours merged, registrations looked up, layouts planned.
    pub fn prepare(
        &self,
        op: Op,
        agent: &str,
        descs: impl IntoIterator<Item = XferDesc>,
    ) -> Result<Prepared> {
        let descs = coalesce(descs);
        let resolved = self.resolve(agent, &descs)?;
        Ok(Prepared {
            op,
            agent: agent.to_string(),
            descs,
            resolved,
        })
    }

    /// Every descriptor's registrations, checked, under one lock; each
    /// looked up once per run of descriptors that share it (typically once
    /// per transfer).
    fn resolve(&self, agent: &str, descs: &[XferDesc]) -> Result<Resolved> {
        let mut local: Vec<Piece> = Vec::with_capacity(descs.len());
        // The target checks every range against its registrations of this kind.
        let mut remote_kind = None;
        let reg = lock(&self.inner.reg);
        let mut last_local: Option<(u64, Arc<LocalRegion>)> = None;
        let mut last_remote = None;
        for d in descs {
            let l = match &last_local {
                Some((id, l)) if *id == d.local_md => l,
                _ => &last_local.insert((d.local_md, reg.local(d.local_md)?)).1,
            };
            let off = l.offset_of(d.local_addr, d.len).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "local range {:#x}+{} is outside its registration",
                    d.local_addr, d.len
                ))
            })?;
            if last_remote != Some(d.remote_md) {
                let r: &RemoteRegion = reg.remote(d.remote_md)?;
                if r.agent != agent {
                    return Err(Error::InvalidArgument(format!(
                        "remote descriptor belongs to {:?}, not {agent:?}",
                        r.agent
                    )));
                }
                if *remote_kind.get_or_insert(r.kind) != r.kind {
                    return Err(Error::InvalidArgument(
                        "remote descriptors of one transfer must all be one memory kind".into(),
                    ));
                }
                last_remote = Some(d.remote_md);
            }
            local.push((l.clone(), off, d.len as usize));
        }
        let generation = reg.generation();
        drop(reg);
        let remote = remote_kind.unwrap_or(Mem::Dram);
        let mut pieces = local.into_iter();
        let batches = descs
            .chunks(MAX_DESCS)
            .map(|ds| {
                let pieces: Vec<Piece> = pieces.by_ref().take(ds.len()).collect();
                let shapes = pieces.iter().map(|(r, _, len)| (*len as u64, r.kind));
                Batch {
                    layout: pack::plan(shapes, remote, self.inner.opts.pack_dram),
                    wire: ds
                        .iter()
                        .map(|d| Desc {
                            addr: d.remote_addr,
                            len: d.len,
                        })
                        .collect(),
                    pieces,
                }
            })
            .collect();
        Ok(Resolved {
            generation,
            remote,
            batches,
        })
    }

    /// Posts a prepared transfer (again: NIXL reposts finished handles).
    pub fn post_prepared(&self, p: &Prepared, notif: Option<&[u8]>) -> Result<Arc<XferState>> {
        if notif.is_some_and(|n| n.len() > MAX_NOTIF) {
            return Err(Error::InvalidArgument(format!(
                "notification longer than {MAX_NOTIF} bytes"
            )));
        }
        // A registration that went since the prepare is refused, as at the prepare.
        let fresh;
        let r = if lock(&self.inner.reg).generation() == p.resolved.generation {
            &p.resolved
        } else {
            fresh = self.resolve(&p.agent, &p.descs)?;
            &fresh
        };
        let (op, agent, mem) = (p.op, p.agent.as_str(), r.remote.nixl());
        let link = handshake::ensure(&self.inner, agent)?;
        let xfer = Arc::new(XferState::new(link.clone(), r.batches.len()));
        if r.batches.is_empty() {
            // Nothing to move; a notification still travels.
            if let Some(n) = notif {
                link.send(vec![Item::Msg(Msg::Notif { msg: n.to_vec() }.encode())])?;
            }
            xfer.batch_done();
            return Ok(xfer);
        }
        if op == Op::Read {
            if let Some(n) = notif {
                xfer.notify_after(link.clone(), n.to_vec());
            }
        }
        let last = r.batches.len() - 1;
        for (i, b) in r.batches.iter().enumerate() {
            let id = self.inner.id();
            let sinks = if op == Op::Read {
                b.pieces.clone()
            } else {
                Vec::new()
            };
            // Registered before sending: the answer may beat us back.
            lock(&self.inner.pending).insert(
                id,
                Pending {
                    peer: agent.to_string(),
                    xfer: xfer.clone(),
                    sinks,
                    layout: b.layout.clone(),
                },
            );
            let items = match op {
                Op::Write => {
                    let hdr = Msg::Write {
                        id,
                        mem,
                        descs: b.wire.clone(),
                        layout: b.layout.clone(),
                        notif: if i == last {
                            notif.map(|n| n.to_vec())
                        } else {
                            None
                        },
                    };
                    let mut items = Vec::with_capacity(1 + b.layout.len());
                    items.push(Item::Msg(hdr.encode()));
                    items.extend(payloads(b.pieces.clone(), &b.layout));
                    items
                }
                Op::Read => vec![Item::Msg(
                    Msg::Read {
                        id,
                        mem,
                        descs: b.wire.clone(),
                        layout: b.layout.clone(),
                    }
                    .encode(),
                )],
            };
            if let Err(e) = link.send(items) {
                lock(&self.inner.pending).remove(&id);
                xfer.fail(e.clone());
                return Err(e);
            }
        }
        Ok(xfer)
    }

    /// Sends a standalone notification.
    pub fn gen_notif(&self, agent: &str, msg: &[u8]) -> Result<()> {
        if msg.len() > MAX_NOTIF {
            return Err(Error::InvalidArgument(format!(
                "notification longer than {MAX_NOTIF} bytes"
            )));
        }
        let link = handshake::ensure(&self.inner, agent)?;
        link.send(vec![Item::Msg(Msg::Notif { msg: msg.to_vec() }.encode())])
    }

    /// Takes the notifications received so far (each is returned once),
    /// after reading what peers sent meanwhile.
    pub fn take_notifs(&self) -> Vec<(String, Vec<u8>)> {
        let links: Vec<_> = lock(&self.inner.links).values().cloned().collect();
        for l in links {
            l.help();
        }
        let got = std::mem::take(&mut *lock(&self.inner.notifs));
        if got.is_empty() {
            // Callers poll this in a loop; leave the CPU to the threads moving data.
            std::thread::yield_now();
        }
        got
    }

    /// Puts taken notifications the caller could not keep back in front of
    /// the queue, in order.
    pub fn requeue_notifs(&self, mut notifs: Vec<(String, Vec<u8>)>) {
        let mut q = lock(&self.inner.notifs);
        notifs.append(&mut q);
        *q = notifs;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        for (_, l) in lock(&self.inner.links).drain() {
            l.close();
        }
        let threads = std::mem::take(&mut *lock(&self.inner.threads));
        for t in threads {
            let _ = t.join();
        }
        // Threads spawned while we joined (a late accept) see `stop` and exit.
        let late = std::mem::take(&mut *lock(&self.inner.threads));
        for t in late {
            let _ = t.join();
        }
    }
}

/// A transfer prepared once ([`Engine::prepare`]) and posted any number of
/// times.
pub struct Prepared {
    op: Op,
    agent: String,
    /// Merged descriptors, resolved again when a registration went since.
    descs: Vec<XferDesc>,
    resolved: Resolved,
}

/// What a post sends, valid while no registration went.
struct Resolved {
    /// [`Registry::generation`] when resolved.
    generation: u64,
    /// Memory kind of the remote descriptors.
    remote: Mem,
    /// At most [`MAX_DESCS`] descriptors each.
    batches: Vec<Batch>,
}

/// One Write or Read message's worth of a transfer.
struct Batch {
    wire: Vec<Desc>,
    pieces: Vec<Piece>,
    layout: Vec<u32>,
}

/// Merges neighbours that are adjacent on both sides (same registrations):
/// one descriptor instead of several, moved alike.
fn coalesce(descs: impl IntoIterator<Item = XferDesc>) -> Vec<XferDesc> {
    let descs = descs.into_iter();
    let mut out: Vec<XferDesc> = Vec::with_capacity(descs.size_hint().0);
    for d in descs {
        if let Some(p) = out.last_mut() {
            let next_to = |a: u64, b: u64| a.checked_add(p.len) == Some(b);
            let merged = p.len.checked_add(d.len);
            if p.local_md == d.local_md
                && p.remote_md == d.remote_md
                && next_to(p.local_addr, d.local_addr)
                && next_to(p.remote_addr, d.remote_addr)
            {
                if let Some(len) = merged {
                    p.len = len;
                    continue;
                }
            }
        }
        out.push(d);
    }
    out
}

/// Status of a transfer as a `nixl_status_t`.
pub fn xfer_status(x: &XferState) -> (i32, Option<Error>) {
    match x.check() {
        Ok(true) => (status::SUCCESS, None),
        Ok(false) => (status::IN_PROG, None),
        Err(e) => (e.status(), Some(e)),
    }
}
