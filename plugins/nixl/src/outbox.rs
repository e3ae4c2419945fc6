//! The outgoing comm to one peer and what is queued on it: posted by the
//! thread that sends (no hand-off for small transfers); what finds every
//! request slot (or every pack buffer) busy waits in order in the backlog.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;

use tcpx::{HostMemory, MemoryRegion, Net, Request, SendComm, Waiter};

use crate::error::Result;
use crate::pack::{Dir, PackBuf, Packs, Piece, Run};
use crate::proto::{MAX_MSG, TAG_DATA, TAG_HDR};
use crate::registry::LocalRegion;

/// Something to put on the wire.
pub enum Item {
    /// A protocol message (tag `TAG_HDR`).
    Msg(Vec<u8>),
    /// A payload from registered memory: region, offset, length (tag `TAG_DATA`).
    Data(Arc<LocalRegion>, usize, usize),
    /// Several descriptors' bytes in one payload (tag `TAG_DATA`), gathered
    /// into a pack buffer when it is posted (kept if the post must wait).
    Pack(Vec<Piece>, Option<PackBuf>),
}

struct InFlight {
    req: Request,
    /// What the send reads, held until it completes.
    _hdr: Option<MemoryRegion>,
    _pack: Option<PackBuf>,
}

/// The outgoing comm and what is queued on it.
pub(crate) struct Outbox {
    comm: SendComm,
    inflight: VecDeque<InFlight>,
    /// Messages that travel inline are copied out during isend, so one
    /// buffer serves them all (a fresh mapping per message cost more than
    /// the send).
    scratch: MemoryRegion,
    /// Items that found every request slot busy, in order; nothing newer
    /// is posted before them, so units never interleave on the wire.
    backlog: VecDeque<Item>,
    packs: Arc<Packs>,
}

impl Outbox {
    pub fn new(net: &Net, comm: SendComm, packs: Arc<Packs>) -> Result<Self> {
        let inline = net.config().inline_threshold.min(MAX_MSG);
        Ok(Outbox {
            comm,
            inflight: VecDeque::new(),
            scratch: net.reg_mr(HostMemory::zeroed(inline)?),
            backlog: VecDeque::new(),
            packs,
        })
    }

    /// Queues a unit's items behind what is already waiting.
    pub fn queue(&mut self, unit: Vec<Item>) {
        self.backlog.extend(unit);
    }

    /// What moves when the oldest send in flight does.
    pub fn oldest(&self) -> Option<Waiter> {
        self.inflight.front().map(|f| f.req.waiter())
    }

    /// Posts the backlog until a slot is missing, and drops finished sends
    /// (inline ones finish as they are posted).
    pub fn advance(&mut self, net: &Net) -> Result<()> {
        // Finished sends first: a send is sent inline only when no larger
        // one is outstanding (tcpx's lone messages).
        self.reap()?;
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
    pub fn idle(&self) -> bool {
        self.backlog.is_empty() && self.inflight.is_empty()
    }

    /// Posts one item (`more`: another follows at once); hands it back
    /// when every request slot, or every pack buffer, is busy.
    fn post(&mut self, net: &Net, it: Item, more: bool) -> Result<Option<Item>> {
        let (req, hdr) = match &it {
            Item::Pack(..) => return self.post_pack(net, it, more),
            Item::Msg(b) if b.len() <= self.scratch.len() => {
                // No request holds the scratch region: inline sends copy at once.
                self.scratch.bytes_mut()?[..b.len()].copy_from_slice(b);
                (
                    isend(&self.comm, &self.scratch, b.len(), 0, TAG_HDR, more)?,
                    None,
                )
            }
            Item::Msg(b) => {
                let mr = net.reg_mr(HostMemory::from_slice(b)?);
                (
                    isend(&self.comm, &mr, mr.len(), 0, TAG_HDR, more)?,
                    Some(mr),
                )
            }
            Item::Data(r, off, len) => {
                (isend(&self.comm, &r.mr, *len, *off, TAG_DATA, more)?, None)
            }
        };
        Ok(match req {
            Some(req) => {
                self.inflight.push_back(InFlight {
                    req,
                    _hdr: hdr,
                    _pack: None,
                });
                None
            }
            None => Some(it),
        })
    }

    /// Gathers a pack into a free pack buffer (once) and posts it.
    fn post_pack(&mut self, net: &Net, it: Item, more: bool) -> Result<Option<Item>> {
        let Item::Pack(pieces, buf) = it else {
            return Ok(Some(it));
        };
        let buf = match buf {
            Some(b) => b,
            None => match self.packs.take(net, Dir::Send, &pieces)? {
                Some(mut b) => {
                    b.gather(&pieces)?;
                    b
                }
                None => return Ok(Some(Item::Pack(pieces, None))),
            },
        };
        let req = match buf.mr() {
            Some(mr) => isend(&self.comm, mr, buf.len(), 0, TAG_DATA, more)?,
            None => None,
        };
        Ok(match req {
            Some(req) => {
                self.inflight.push_back(InFlight {
                    req,
                    _hdr: None,
                    _pack: Some(buf),
                });
                None
            }
            // Gathered already: kept with the item for the next try.
            None => Some(Item::Pack(pieces, Some(buf))),
        })
    }

    /// Drops finished sends, in any order, in one pass.
    fn reap(&mut self) -> Result<()> {
        let mut failed = None;
        self.inflight.retain_mut(|f| match f.req.test() {
            Ok(done) => done.is_none(),
            Err(e) => {
                failed.get_or_insert(e);
                true
            }
        });
        failed.map_or(Ok(()), |e| Err(e.into()))
    }
}

/// `len` bytes of `mr` from `off` (`more`: another send follows at once).
fn isend(
    comm: &SendComm,
    mr: &MemoryRegion,
    len: usize,
    off: usize,
    tag: i32,
    more: bool,
) -> tcpx::Result<Option<Request>> {
    if more {
        comm.isend_more(mr, off, len, tag)
    } else {
        comm.isend(mr, off, len, tag)
    }
}

/// The payload items of descriptors `pieces` sent by `layout`: one
/// descriptor alone as it is, several as a pack.
pub(crate) fn payloads(pieces: Vec<Piece>, layout: &[u32]) -> impl Iterator<Item = Item> + '_ {
    crate::pack::split(pieces, layout).map(|run| match run {
        Run::One((r, off, len)) => Item::Data(r, off, len),
        Run::Pack(ps) => Item::Pack(ps, None),
    })
}
