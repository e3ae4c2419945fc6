//! The outgoing comm to one peer and what is queued on it: posted by the
//! thread that sends (no hand-off for small transfers); what finds every
//! request slot busy waits in order in the backlog.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;

use tcpx::{HostMemory, MemoryRegion, Net, Request, SendComm, Waiter};

use crate::error::Result;
use crate::proto::{MAX_MSG, TAG_DATA, TAG_HDR};
use crate::registry::LocalRegion;

/// Something to put on the wire.
pub enum Item {
    /// A protocol message (tag `TAG_HDR`).
    Msg(Vec<u8>),
    /// A payload from registered memory: region, offset, length (tag `TAG_DATA`).
    Data(Arc<LocalRegion>, usize, usize),
}

struct InFlight {
    req: Request,
    _hdr: Option<MemoryRegion>,
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
}

impl Outbox {
    pub fn new(net: &Net, comm: SendComm) -> Result<Self> {
        let inline = net.config().inline_threshold.min(MAX_MSG);
        Ok(Outbox {
            comm,
            inflight: VecDeque::new(),
            scratch: net.reg_mr(HostMemory::zeroed(inline)?),
            backlog: VecDeque::new(),
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
