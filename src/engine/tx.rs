//! The sending half of a data socket: it asks its comm for the next chunk
//! whenever it can take one (work-conserving, `ctrl::sched`), writes it,
//! and reports how far the peer acknowledged its stream.
//!
//! A chunk holds its message ([`TxMsg`]) while its bytes may still be
//! read: until they are written (copying sends) or the kernel's
//! zero-copy completion came. A message's request piece completes when
//! the last holder lets go. Once the receiver has the whole message, a
//! copy still being written needs none of its bytes: the rest of it goes
//! out as zeros (the receiver drops it) and the memory is let go at once,
//! unless a zero-copy send of it (MSG_ZEROCOPY, devmem TX) may still read it.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::devmem_tx::{DevmemBody, DevmemTx};
use super::link::CommLink;
use crate::config::ZeroCopy;
use crate::error::{Error, Result};
use crate::memory::{Lane, Region, TxPath};
use crate::request::ReqState;
use crate::stats::SockCounters;
use crate::wire::{Chunk, CHUNK_LEN};
use crate::zerocopy::Tracker;

/// Zeros sent in place of a copy's bytes once its message is in place.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A chunked message being sent.
pub(crate) struct TxMsg {
    pub seq: u64,
    pub region: Arc<Region>,
    /// Offset of the message in the region.
    pub base: u64,
    pub size: u64,
    pub chunk_size: u64,
    /// Every chunk is in place at the receiver.
    pub acked: AtomicBool,
    /// Declared last: dropped after `region`.
    _done: TxDone,
}

/// Completes a request piece when the message's last holder lets go.
struct TxDone(Arc<ReqState>);

impl Drop for TxDone {
    fn drop(&mut self) {
        self.0.piece_done();
    }
}

impl TxMsg {
    /// A message of `req`, which counts one piece for it.
    pub fn new(
        seq: u64,
        region: Arc<Region>,
        base: u64,
        size: u64,
        chunk_size: u64,
        req: Arc<ReqState>,
    ) -> Self {
        TxMsg {
            seq,
            region,
            base,
            size,
            chunk_size,
            acked: AtomicBool::new(false),
            _done: TxDone(req),
        }
    }

    /// Offset and length of chunk `k`.
    pub fn chunk(&self, k: u64) -> (u64, usize) {
        let off = k * self.chunk_size;
        (off, (self.size - off).min(self.chunk_size) as usize)
    }
}

/// One chunk handed to a socket.
pub(crate) struct TxChunk {
    /// `None` once the message is in place: the rest goes out as zeros.
    pub msg: Option<Arc<TxMsg>>,
    pub seq: u64,
    pub off: u64,
    pub len: usize,
    /// A re-send or a copy.
    pub again: bool,
    /// Id of the last MSG_ZEROCOPY send that carried its bytes.
    zc_last: Option<u32>,
}

impl TxChunk {
    pub fn new(msg: Arc<TxMsg>, k: u64, again: bool) -> Self {
        let (off, len) = msg.chunk(k);
        TxChunk {
            seq: msg.seq,
            msg: Some(msg),
            off,
            len,
            again,
            zc_last: None,
        }
    }

    fn in_place(&self) -> bool {
        self.msg
            .as_ref()
            .is_some_and(|m| m.acked.load(Ordering::Acquire))
    }
}

/// Zero-copy state of a data socket.
pub(super) struct Zc {
    /// False once the kernel reported copying in `auto` mode (or SO_ZEROCOPY failed).
    pub enabled: bool,
    pub mode: ZeroCopy,
    pub min: usize,
    pub tracker: Tracker,
    /// Chunks fully written whose last zero-copy send is not yet acknowledged.
    awaiting: VecDeque<TxChunk>,
}

impl Zc {
    pub fn new(enabled: bool, mode: ZeroCopy, min: usize) -> Self {
        Zc {
            enabled,
            mode,
            min,
            tracker: Tracker::default(),
            awaiting: VecDeque::new(),
        }
    }
}

/// The next send: up to two pieces (header rest, body rest), or a body
/// that leaves by devmem TX.
pub(super) struct TxPlan {
    pub parts: [(*const u8, usize); 2],
    pub n: usize,
    pub zerocopy: bool,
    pub devmem: Option<DevmemBody>,
}

impl TxPlan {
    /// The rest of a chunk's header by itself, in a copying send: the next
    /// chunk rewrites the header, so no zero-copy send may keep it.
    fn header_alone(hdr: (*const u8, usize)) -> Self {
        TxPlan {
            parts: [hdr, (std::ptr::null(), 0)],
            n: 1,
            zerocopy: false,
            devmem: None,
        }
    }
}

/// Progress of the chunk being sent.
#[derive(Default)]
struct Cursor {
    active: bool,
    hdr: [u8; CHUNK_LEN],
    hdr_done: usize,
    body_done: usize,
}

/// Which socket of its comm this is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SockId {
    pub index: u16,
    pub gen: u32,
}

pub(super) struct TxSide {
    pub id: SockId,
    /// Whose staging this socket's chunks use, sent and received.
    pub lane: Lane,
    /// The chunk being sent first; a prefetched one may follow.
    queue: VecDeque<TxChunk>,
    cur: Cursor,
    /// Bytes of the stream the kernel took.
    written: u64,
    /// The comm's epoch when it last had nothing for this socket.
    idle_at: Option<u64>,
    pub zc: Zc,
}

impl TxSide {
    pub fn new(id: SockId, lane: Lane, zc: Zc) -> Self {
        TxSide {
            id,
            lane,
            queue: VecDeque::new(),
            cur: Cursor::default(),
            written: 0,
            idle_at: None,
            zc,
        }
    }

    /// The stream's end once the queued chunks are written.
    fn end(&self) -> u64 {
        let mut end = self.written;
        for (i, c) in self.queue.iter().enumerate() {
            let total = (CHUNK_LEN + c.len) as u64;
            end += if i == 0 && self.cur.active {
                total - (self.cur.hdr_done + self.cur.body_done) as u64
            } else {
                total
            };
        }
        end
    }

    /// Stream bytes the peer acknowledged: written minus what the kernel
    /// still holds (SIOCOUTQ: unsent plus unacknowledged).
    fn acked(&self, stream: &TcpStream) -> u64 {
        self.written.saturating_sub(outq(stream))
    }

    /// Asks the comm for a chunk (unless nothing changed since it last
    /// had none).
    fn pull(&mut self, stream: &TcpStream, comm: &Arc<dyn CommLink>) -> bool {
        let epoch = comm.epoch();
        if self.idle_at == Some(epoch) {
            return false;
        }
        let (acked, end) = (self.acked(stream), self.end());
        match comm.pull(self.id, acked, end, Instant::now()) {
            Some(c) => {
                self.idle_at = None;
                self.queue.push_back(c);
                true
            }
            None => {
                self.idle_at = Some(epoch);
                false
            }
        }
    }

    /// What to send next (a body by devmem TX where `devmem` names the
    /// region); `Ok(None)` when the comm has nothing for it.
    pub fn plan(
        &mut self,
        stream: &TcpStream,
        comm: &Arc<dyn CommLink>,
        devmem: Option<&DevmemTx>,
    ) -> Result<Option<TxPlan>> {
        loop {
            if self.queue.is_empty() && !self.pull(stream, comm) {
                return Ok(None);
            }
            // A chunk not begun whose message is in place needs no sending.
            if !self.cur.active && self.queue.front().is_some_and(TxChunk::in_place) {
                if let Some(mut c) = self.queue.pop_front() {
                    blank(&mut c, self.lane);
                }
                continue;
            }
            break;
        }
        let Some(c) = self.queue.front_mut() else {
            return Ok(None);
        };
        if c.in_place() && c.zc_last.is_none() {
            blank(c, self.lane);
        }
        let starting = !self.cur.active;
        if starting {
            self.cur = Cursor {
                active: true,
                hdr: Chunk {
                    seq: c.seq,
                    offset: c.off,
                    len: c.len as u32,
                }
                .encode(),
                ..Cursor::default()
            };
        }
        let done = self.cur.body_done;
        let hdr_left = CHUNK_LEN - self.cur.hdr_done;
        let hdr = (self.cur.hdr[self.cur.hdr_done..].as_ptr(), hdr_left);
        if let Some(body) = c.msg.as_ref().and_then(|m| {
            devmem.and_then(|d| d.body(&m.region, m.base + c.off + done as u64, c.len - done))
        }) {
            // Header by a plain send (the next chunk rewrites it), then the body.
            return Ok(Some(if hdr_left > 0 {
                TxPlan::header_alone(hdr)
            } else {
                TxPlan {
                    parts: [(std::ptr::null(), 0); 2],
                    n: 0,
                    zerocopy: true,
                    devmem: Some(body),
                }
            }));
        }
        let (body, zc_ok, prefetch) = match &c.msg {
            Some(m) => {
                let src = m.region.source(self.lane, m.base + c.off, c.len)?;
                (
                    (src.wrapping_add(done), c.len - done),
                    m.region.zerocopy_ok(),
                    starting && m.region.prefetches(),
                )
            }
            None => (
                (ZEROS.as_ptr(), (c.len - done).min(ZEROS.len())),
                false,
                false,
            ),
        };
        let len = c.len;
        // Staging paths copy the next chunk while this one is sent.
        if prefetch {
            if self.queue.len() == 1 {
                self.pull(stream, comm);
            }
            if let Some(n) = self.queue.get(1) {
                if let Some(m) = &n.msg {
                    m.region.prefetch(self.lane, m.base + n.off, n.len);
                }
            }
        }
        let zc_chunk = self.zc.enabled && len >= self.zc.min && zc_ok;
        Ok(Some(if hdr_left == 0 {
            TxPlan {
                parts: [body, (std::ptr::null(), 0)],
                n: 1,
                zerocopy: zc_chunk,
                devmem: None,
            }
        } else if zc_chunk {
            // With zero-copy the kernel reads the iovecs after the call returns, so the
            // header (which the next chunk overwrites) goes first in a copying send.
            TxPlan::header_alone(hdr)
        } else {
            TxPlan {
                parts: [hdr, body],
                n: 2,
                zerocopy: false,
                devmem: None,
            }
        }))
    }

    /// `n` bytes of the last plan went out; `zc_id` is the zero-copy id of that send.
    pub fn done(
        &mut self,
        n: usize,
        zc_id: Option<u32>,
        counters: &SockCounters,
        stream: &TcpStream,
        comm: &Arc<dyn CommLink>,
    ) {
        self.written += n as u64;
        let Some(c) = self.queue.front_mut() else {
            return;
        };
        if zc_id.is_some() {
            c.zc_last = zc_id;
        }
        let h = n.min(CHUNK_LEN - self.cur.hdr_done);
        self.cur.hdr_done += h;
        self.cur.body_done += n - h;
        if self.cur.hdr_done < CHUNK_LEN || self.cur.body_done < c.len {
            return;
        }
        self.cur.active = false;
        if let Some(m) = &c.msg {
            m.region.sent(self.lane, m.base + c.off, c.len);
        }
        counters.sent(c.len as u64, c.again);
        if let Some(done) = self.queue.pop_front() {
            match done.zc_last {
                Some(id) if !self.zc.tracker.done_through(id) => self.zc.awaiting.push_back(done),
                _ => drop(done),
            }
        }
        // Once per chunk: what others' choices see of this socket.
        comm.publish(self.id, self.acked(stream), self.end());
    }

    /// The periodic look: tells the comm how far the peer acknowledged,
    /// and lets go of the memory of a copy whose message is in place.
    pub fn tick(&mut self, stream: &TcpStream, comm: &Arc<dyn CommLink>, now: Instant) {
        // Copies of a stuck tail come with time: look again.
        self.idle_at = None;
        if let Some(c) = self.queue.front_mut() {
            if self.cur.active && c.in_place() && c.zc_last.is_none() {
                blank(c, self.lane);
            }
        }
        comm.sample(self.id, self.acked(stream), self.end(), now);
    }

    /// Finishes chunks whose zero-copy sends are all acknowledged. True if any finished.
    pub fn release_zc(&mut self) -> bool {
        let mut moved = false;
        while self
            .zc
            .awaiting
            .front()
            .is_some_and(|c| c.zc_last.is_some_and(|id| self.zc.tracker.done_through(id)))
        {
            self.zc.awaiting.pop_front();
            moved = true;
        }
        moved
    }

    /// Lets go of every chunk (the socket is gone): staged bytes of the
    /// one being sent, or of one staged ahead, go back first.
    pub fn clear(&mut self) {
        for mut c in self.queue.drain(..) {
            blank(&mut c, self.lane);
        }
        self.cur.active = false;
        self.zc.awaiting.clear();
    }
}

/// Lets go of a chunk's memory (its staging too, if any): the rest of it
/// goes out as zeros, if at all.
fn blank(c: &mut TxChunk, lane: Lane) {
    if let Some(m) = c.msg.take() {
        m.region.sent(lane, m.base + c.off, c.len);
    }
}

/// Bytes the kernel holds for the socket: unsent plus unacknowledged (SIOCOUTQ).
pub(crate) fn outq(stream: &TcpStream) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        n.max(0) as u64
    } else {
        0
    }
}

/// Sets an integer socket option (`setsockopt` with a `c_int` value).
pub(crate) fn set_int_option(
    s: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid socket fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Caps the socket's unsent bytes (TCP_NOTSENT_LOWAT): it turns writable,
/// and asks for its next chunk, only when the kernel is nearly through
/// what it has, so a slow path holds little that faster ones could carry.
pub(super) fn set_notsent_lowat(s: &TcpStream, bytes: u32) -> Result<()> {
    set_int_option(
        s,
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        bytes as libc::c_int,
    )
    .map_err(|e| Error::io("TCP_NOTSENT_LOWAT", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::devmem_rx::tests::loaded;
    use crate::memory::{HostMemory, MemoryRegion};
    use std::sync::Mutex;

    /// A comm that hands out the chunks it is given, in order.
    #[derive(Default)]
    struct Deal(Mutex<VecDeque<TxChunk>>);

    impl CommLink for Deal {
        fn failed(&self, _: Error) {}
        fn pull(&self, _: SockId, _: u64, _: u64, _: Instant) -> Option<TxChunk> {
            self.0.lock().unwrap().pop_front()
        }
    }

    fn message(n_chunks: u64) -> (Arc<TxMsg>, MemoryRegion, Arc<ReqState>) {
        let mut mem = HostMemory::zeroed(n_chunks as usize * 4096).unwrap();
        mem.fill(0xAB);
        let mr = MemoryRegion::owned(mem);
        let req = Arc::new(ReqState::new(1, 1));
        let m = TxMsg::new(5, mr.inner.clone(), 0, n_chunks * 4096, 4096, req.clone());
        (Arc::new(m), mr, req)
    }

    fn side() -> TxSide {
        TxSide::new(
            SockId { index: 0, gen: 0 },
            Lane::fresh(),
            Zc::new(false, ZeroCopy::Off, 0),
        )
    }

    /// The bytes a plan points at.
    fn bytes_of(p: &TxPlan) -> Vec<u8> {
        p.parts[..p.n]
            .iter()
            // SAFETY: the plan's parts are valid for reads while the test holds the chunk.
            .flat_map(|&(ptr, len)| unsafe { crate::engine::bytes(ptr, len) }.to_vec())
            .collect()
    }

    #[test]
    fn a_copy_whose_message_is_in_place_goes_out_as_zeros_and_lets_go_of_the_memory() {
        let (stream, _peer) = loaded(&[]);
        let (m, mut mr, req) = message(2);
        let deal = Deal::default();
        deal.0
            .lock()
            .unwrap()
            .push_back(TxChunk::new(m.clone(), 1, true));
        let comm: Arc<dyn CommLink> = Arc::new(deal);
        let mut tx = side();
        let counters = SockCounters::default();
        let p = tx.plan(&stream, &comm, None).unwrap().unwrap();
        let first = bytes_of(&p);
        assert_eq!(first.len(), CHUNK_LEN + 4096);
        assert!(first[CHUNK_LEN..].iter().all(|&b| b == 0xAB));
        // The header and part of the body went out; then the receiver has
        // the whole message (another socket's copy got there first).
        tx.done(CHUNK_LEN + 100, None, &counters, &stream, &comm);
        m.acked.store(true, Ordering::Release);
        drop(m);
        let p = tx.plan(&stream, &comm, None).unwrap().unwrap();
        let rest = bytes_of(&p);
        assert_eq!(
            rest.len(),
            4096 - 100,
            "the rest of the chunk, for the stream's sake"
        );
        assert!(rest.iter().all(|&b| b == 0), "as zeros");
        assert!(
            req.is_done(),
            "the memory was let go: the message's piece is done"
        );
        assert!(mr.bytes().is_ok(), "and the region is free");
        tx.done(rest.len(), None, &counters, &stream, &comm);
        assert_eq!(counters.snapshot().resent_chunks, 1);
        assert!(tx.plan(&stream, &comm, None).unwrap().is_none());
    }

    #[test]
    fn a_chunk_not_begun_whose_message_is_in_place_is_skipped() {
        let (stream, _peer) = loaded(&[]);
        let (done_msg, _mr, _req) = message(1);
        let (live_msg, _mr2, _req2) = message(1);
        done_msg.acked.store(true, Ordering::Release);
        let deal = Deal::default();
        deal.0
            .lock()
            .unwrap()
            .push_back(TxChunk::new(done_msg, 0, false));
        deal.0
            .lock()
            .unwrap()
            .push_back(TxChunk::new(live_msg, 0, false));
        let comm: Arc<dyn CommLink> = Arc::new(deal);
        let mut tx = side();
        let p = tx.plan(&stream, &comm, None).unwrap().unwrap();
        let b = bytes_of(&p);
        assert!(
            b[CHUNK_LEN..].iter().all(|&x| x == 0xAB),
            "the live one's bytes"
        );
        assert_eq!(tx.end(), (CHUNK_LEN + 4096) as u64, "one chunk queued");
    }
}
