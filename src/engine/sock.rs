//! One data socket's send and receive state, independent of how the syscalls
//! are issued: an engine asks for the next I/O (`tx_plan` / `rx_plan`), does
//! it (a syscall, or an io_uring submission) and reports the result
//! (`tx_done` / `rx_done`).
//!
//! A sending socket asks its comm for chunks as it can take them
//! (`tx.rs`). A receiving socket reads a chunk header, asks its comm where
//! that chunk goes ([`CommLink::lookup`]) and lands the body there: chunks
//! are placed by `(seq, offset)`, whatever socket carries them. A chunk
//! counts as in place once its bytes settled (staging copies and unpack
//! kernels finished).
//!
//! A socket whose path fails (an I/O error, the peer's close) is lost to
//! its comm, which goes on without it; an error of the comm's own making
//! (a protocol violation, a failed copy) fails the comm.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use socket2::SockRef;

use super::devmem_rx::{DevmemRx, Dst, Recv};
use super::devmem_tx::{DevmemBody, DevmemTx};
use super::link::{CommLink, Lookup};
use super::placement::{Claim, Placement};
pub(super) use super::tx::TxPlan;
use super::tx::{set_int_option, set_notsent_lowat, SockId, TxSide, Zc};
use super::TxMode;
use crate::config::ZeroCopy;
use crate::error::Error;
use crate::memory::{Lane, RxPath};
use crate::path::{rx_route, RxRoute};
use crate::stats::{Counters, SockCounters};
use crate::wire::{Chunk, CHUNK_LEN};
use crate::zerocopy;

/// Largest piece of a discarded chunk read at once.
const SCRATCH_LEN: usize = 1 << 20;
/// Chunks landed before a socket waits for their copies to finish.
const MAX_UNSETTLED: usize = 8;

/// The body of the chunk being received.
struct Body {
    /// `None`: read and drop (a duplicate, or a message that needs no bytes).
    dst: Option<Arc<Placement>>,
    /// Offset of the chunk in its message.
    off: u64,
    len: usize,
    done: usize,
    /// The body goes straight to device memory (GPU pool, CUDA region):
    /// no staging to land.
    direct: bool,
}

/// Progress of the chunk being received: its header, then its body.
struct RxCursor {
    hdr: [u8; CHUNK_LEN],
    hdr_done: usize,
    body: Option<Body>,
    /// The header names a message the comm does not know yet, or a chunk
    /// another socket holds; the comm's kick count when the socket last
    /// asked the comm to read its control socket.
    parked: Option<u64>,
}

/// The next receive: header rest and body rest.
pub(super) struct RxPlan {
    pub parts: [(*mut u8, usize); 2],
}

/// What one devmem receive step did.
pub(super) enum Step {
    Moved,
    WouldBlock,
    Idle,
}

pub(super) struct Sock {
    pub stream: TcpStream,
    devmem: Option<Box<DevmemRx>>,
    devmem_tx: Option<Box<DevmemTx>>,
    pub tx: TxSide,
    rx: RxCursor,
    /// Chunks landed whose copies may still run, oldest first.
    unsettled: Vec<(Arc<Placement>, u64)>,
    /// Bytes received, and that count when a tick last saw it move (see
    /// `CommLink::sender_gone`).
    rx_bytes: u64,
    rx_moved: (u64, Instant),
    comm: Arc<dyn CommLink>,
    receives: bool,
    peer_timeout_ms: u64,
    counters: Arc<SockCounters>,
    quickack: bool,
    pub readable: bool,
    pub writable: bool,
    pub dead: Option<Error>,
}

/// The process logs the kernel's copying of zero-copy sends once.
static COPY_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Sock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: TcpStream,
        mode: TxMode,
        comm: Arc<dyn CommLink>,
        receives: bool,
        mut dead: Option<Error>,
        counters: &Arc<Counters>,
        id: SockId,
        sock_counters: Arc<SockCounters>,
    ) -> Self {
        let enabled = !receives
            && match mode.zerocopy {
                ZeroCopy::Off => false,
                // The kernel copies every zero-copy send to a socket on this
                // host (msg_zerocopy.rst), so `auto` does not try there: one
                // copied send per socket left BBR pacing a whole loopback run
                // slower (1 MiB one way 226-319 µs p50 against 134-219 with
                // none sent; PERFORMANCE.md).
                ZeroCopy::Auto if to_this_host(&stream) => false,
                _ => enable_zerocopy(&stream),
            };
        let devmem = match receives
            .then_some(mode.devmem)
            .flatten()
            .map(|spec| DevmemRx::new(&stream, spec, counters.clone()))
        {
            Some(Ok(d)) => Some(Box::new(d)),
            Some(Err(e)) => {
                dead.get_or_insert(e);
                None
            }
            None => None,
        };
        let devmem_tx = match (!receives)
            .then_some(mode.devmem_tx)
            .flatten()
            .map(|(nic, tx)| DevmemTx::new(&stream, nic, tx))
        {
            Some(Ok(d)) => Some(Box::new(d)),
            Some(Err(e)) => {
                dead.get_or_insert(e);
                None
            }
            None => None,
        };
        // The emulated NIC counts its own zero-copy ids: host MSG_ZEROCOPY
        // sends beside it would take the kernel's.
        let enabled = enabled && !devmem_tx.as_ref().is_some_and(|d| d.emulated);
        if !receives && mode.notsent_lowat > 0 {
            if let Err(e) = set_notsent_lowat(&stream, mode.notsent_lowat) {
                dead.get_or_insert(e);
            }
        }
        Sock {
            stream,
            devmem,
            devmem_tx,
            tx: TxSide::new(
                id,
                Lane::fresh(),
                Zc::new(enabled, mode.zerocopy, mode.min_zcopy),
            ),
            rx: RxCursor {
                hdr: [0; CHUNK_LEN],
                hdr_done: 0,
                body: None,
                parked: None,
            },
            unsettled: Vec::new(),
            rx_bytes: 0,
            rx_moved: (0, Instant::now()),
            comm,
            receives,
            peer_timeout_ms: mode.peer_timeout_ms,
            counters: sock_counters,
            quickack: mode.quickack,
            readable: true,
            writable: true,
            dead,
        }
    }

    /// Lets go of everything the socket holds. Whatever may still write
    /// received bytes (unpack kernels, staging copies) finishes first;
    /// chunks that landed whole count as placed if their copies finished,
    /// the one cut short may come again on another socket.
    fn let_go(&mut self) {
        let mut settled = Ok(());
        if let Some(d) = self.devmem.as_mut() {
            settled = d.settle();
            if let Err(e) = &settled {
                tracing::error!(
                    "devmem unpack did not finish ({e}); its destination may still be written"
                );
            }
        }
        if let Some(Body {
            dst: Some(p),
            off,
            direct,
            ..
        }) = self.rx.body.take()
        {
            if !direct {
                p.region.abandon(self.tx.lane, p.base + off);
            }
            p.unclaim(off);
        }
        let landed: Vec<(Arc<Placement>, u64)> = self.unsettled.drain(..).collect();
        for (i, (p, _)) in landed.iter().enumerate() {
            if landed[..i]
                .iter()
                .all(|(q, _)| !Arc::ptr_eq(&q.region, &p.region))
            {
                settled = settled.and(p.region.settle());
            }
        }
        for (p, off) in landed {
            if settled.is_ok() {
                self.counters.received(p.chunk_len(off));
                p.chunk_placed(off);
            } else {
                p.unclaim(off);
            }
        }
        self.tx.clear();
    }

    /// Fails the socket and its comm (an error of the comm's own data
    /// path or a protocol violation).
    pub fn fail(&mut self, e: Error) {
        self.let_go();
        if self.dead.is_none() {
            self.dead = Some(e.clone());
            self.comm.failed(e);
        }
    }

    /// The socket's path failed: the comm goes on without it.
    pub fn lose(&mut self, e: Error) {
        self.let_go();
        if self.dead.is_none() {
            self.dead = Some(e.clone());
            self.comm.lost(self.tx.id, e);
        }
    }

    /// The comm closed the socket.
    pub fn shut(&mut self) {
        self.let_go();
        self.dead.get_or_insert(Error::Closed);
    }

    pub fn wants_tx(&self) -> bool {
        self.dead.is_none() && !self.receives
    }

    pub fn wants_rx(&self) -> bool {
        self.dead.is_none() && self.receives
    }

    /// What to send next; `None` when there is nothing (or the socket failed).
    pub fn tx_plan(&mut self) -> Option<TxPlan> {
        if !self.wants_tx() {
            return None;
        }
        match self
            .tx
            .plan(&self.stream, &self.comm, self.devmem_tx.as_deref())
        {
            Ok(p) => p,
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    /// `n` bytes of the last plan went out; `zc_id` is the zero-copy id of that send.
    pub fn tx_done(&mut self, n: usize, zc_id: Option<u32>) {
        self.tx
            .done(n, zc_id, &self.counters, &self.stream, &self.comm);
    }

    /// The periodic look (every worker tick): a sending socket tells its
    /// comm how far the peer acknowledged its stream; a receiving one left
    /// silent by a sender that is gone ends.
    pub fn tick(&mut self, now: Instant) {
        if self.wants_tx() {
            self.tx.tick(&self.stream, &self.comm, now);
        }
        if !self.wants_rx() {
            return;
        }
        // A parked socket waits for another one, not for its own bytes.
        if self.rx_moved.0 != self.rx_bytes || self.rx.parked.is_some() {
            self.rx_moved = (self.rx_bytes, now);
        }
        if let Some((at, patience)) = self.comm.sender_gone() {
            if now.saturating_duration_since(self.rx_moved.1.max(at)) >= patience {
                self.lose(Error::ConnectionLost(format!(
                    "no byte on a data socket for {} ms after the sender went",
                    patience.as_millis()
                )));
            }
        }
    }

    /// A sending socket saw a hang-up or an error event: its peer closed
    /// it, or its path failed.
    pub fn hung_up(&mut self, hup: bool) {
        if !self.wants_tx() {
            return;
        }
        match self.stream.take_error() {
            Ok(Some(e)) => self.lose(Error::io("data socket", e)),
            _ if hup => self.lose(Error::ConnectionLost(
                "the peer closed a data socket".into(),
            )),
            _ => {}
        }
    }

    /// Makes sense of a complete chunk header: where its body goes, or
    /// that the socket must wait for the comm to learn of its message.
    fn resolve(&mut self) {
        let c = match Chunk::decode(&self.rx.hdr) {
            Ok(c) => c,
            Err(e) => return self.fail(e),
        };
        let kicks = self.comm.kicks();
        let mut asked = self.rx.parked == Some(kicks);
        let dst = loop {
            match self.comm.lookup(c.seq) {
                Lookup::Place(p) => match p.claim(c.offset, c.len) {
                    Ok(Claim::Mine) => break Some(p),
                    Ok(Claim::Done) => {
                        self.counters.dropped_copy();
                        break None;
                    }
                    // Another socket receives this chunk: wait until it
                    // finishes or lets go (the placement wakes us). It may
                    // hang on a dead path until the sender retires it: have
                    // the control socket read.
                    Ok(Claim::Held) => {
                        if !asked {
                            self.rx.parked = Some(kicks);
                            self.comm.wait_for(c.seq, self.tx.id);
                        }
                        return;
                    }
                    Err(e) => return self.fail(e),
                },
                Lookup::Discard => {
                    self.counters.dropped_copy();
                    break None;
                }
                // Ask (the control socket may hold the announcement unread),
                // look once more, then wait for the comm's next kick.
                Lookup::Unknown if !asked => {
                    self.rx.parked = Some(kicks);
                    asked = true;
                    self.comm.wait_for(c.seq, self.tx.id);
                }
                Lookup::Unknown => return,
            }
        };
        self.rx.parked = None;
        self.rx.hdr_done = 0;
        self.rx.body = Some(Body {
            dst,
            off: c.offset,
            len: c.len as usize,
            done: 0,
            direct: false,
        });
        if c.len == 0 {
            self.finish_body();
        }
    }

    /// The header is still incomplete, or the body's destination is known
    /// (`false`: the socket waits for its comm).
    fn rx_ready(&mut self) -> bool {
        if self.dead.is_some() || !self.receives {
            return false;
        }
        if self.rx.body.is_none() && self.rx.hdr_done == CHUNK_LEN {
            self.resolve();
        }
        self.dead.is_none() && (self.rx.body.is_some() || self.rx.hdr_done < CHUNK_LEN)
    }

    /// Where to receive next: the rest of the body and then the next
    /// header, or the rest of the header; `None` when the socket waits.
    pub fn rx_plan(&mut self, scratch: &mut Vec<u8>) -> Option<RxPlan> {
        if !self.rx_ready() {
            return None;
        }
        let hdr_done = self.rx.hdr_done;
        let hdr = (self.rx.hdr[hdr_done..].as_mut_ptr(), CHUNK_LEN - hdr_done);
        let Some(b) = self.rx.body.as_ref() else {
            return Some(RxPlan {
                parts: [hdr, (std::ptr::null_mut(), 0)],
            });
        };
        let want = b.len - b.done;
        let body = match &b.dst {
            Some(p) => match p
                .region
                .sink(self.tx.lane, p.base + b.off + b.done as u64, want)
            {
                Ok(ptr) => (ptr, want),
                Err(e) => {
                    self.fail(e);
                    return None;
                }
            },
            None => {
                if scratch.is_empty() {
                    scratch.resize(SCRATCH_LEN, 0);
                }
                (scratch.as_mut_ptr(), want.min(scratch.len()))
            }
        };
        // The next header may come in the same read, once the body is whole.
        let next = if body.1 == want {
            hdr
        } else {
            (std::ptr::null_mut(), 0)
        };
        Some(RxPlan {
            parts: [body, next],
        })
    }

    /// `n` bytes arrived for the last plan (0 = the peer closed).
    pub fn rx_done(&mut self, n: usize) {
        self.rx_bytes += n as u64;
        if n == 0 {
            self.lose(Error::ConnectionLost(
                "the peer closed a data socket".into(),
            ));
            return;
        }
        let mut rest = n;
        if let Some(b) = self.rx.body.as_mut() {
            let took = rest.min(b.len - b.done);
            b.done += took;
            rest -= took;
            if b.done == b.len {
                self.finish_body();
            }
        }
        self.rx.hdr_done = (self.rx.hdr_done + rest).min(CHUNK_LEN);
        if self.rx.body.is_none() && self.rx.hdr_done == CHUNK_LEN {
            self.resolve();
        }
    }

    /// The body of the current chunk is received: lands it, and counts it
    /// in place now or once its copies settle.
    fn finish_body(&mut self) {
        let Some(b) = self.rx.body.take() else {
            return;
        };
        if self.quickack && self.rx.hdr_done == 0 {
            // The kernel leaves quick-ACK mode on its own; set it again each time.
            let _ = SockRef::from(&self.stream).set_quickack(true);
        }
        let Some(p) = b.dst else {
            return;
        };
        if !b.direct {
            if let Err(e) = p.region.landed(self.tx.lane, p.base + b.off, b.len) {
                p.unclaim(b.off);
                return self.fail(e);
            }
        }
        if self.devmem.is_some() || p.region.stages() {
            self.unsettled.push((p, b.off));
            if self.unsettled.len() >= MAX_UNSETTLED {
                self.settle();
            }
        } else {
            self.counters.received(b.len as u64);
            p.chunk_placed(b.off);
        }
    }

    /// Waits for the copies of landed chunks and counts them in place.
    /// True if any were waiting.
    pub fn settle(&mut self) -> bool {
        if self.unsettled.is_empty() {
            return false;
        }
        let mut settled = self.devmem.as_mut().map_or(Ok(()), |d| d.settle());
        for (i, (p, _)) in self.unsettled.iter().enumerate() {
            let seen = self.unsettled[..i]
                .iter()
                .any(|(q, _)| Arc::ptr_eq(&q.region, &p.region));
            if !seen && settled.is_ok() {
                settled = p.region.settle();
            }
        }
        match settled {
            Ok(()) => {
                for (p, off) in std::mem::take(&mut self.unsettled) {
                    self.counters.received(p.chunk_len(off));
                    p.chunk_placed(off);
                }
            }
            Err(e) => self.fail(e),
        }
        true
    }

    /// Applies a zero-copy completion; in `auto` mode a copying kernel turns zero-copy off.
    pub fn zc_completed(&mut self, c: zerocopy::Completion, counters: &Counters) {
        let zc = &mut self.tx.zc;
        zc.tracker.complete(c);
        let n = c.hi.wrapping_sub(c.lo).wrapping_add(1) as u64;
        Counters::bump(
            if c.copied {
                &counters.zc_copied
            } else {
                &counters.zc_acked
            },
            n,
        );
        if c.copied && zc.mode == ZeroCopy::Auto && zc.enabled {
            // As msg_zerocopy.rst advises: the kernel copies anyway (loopback, or a NIC
            // without scatter-gather/checksum offload), so stop paying for notifications.
            zc.enabled = false;
            Counters::bump(&counters.zc_switched_off, 1);
            let peer = self
                .stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if !COPY_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(%peer, "the kernel copies MSG_ZEROCOPY sends on this path; these sockets use plain sends (logged once)");
            } else {
                tracing::debug!(%peer, "zero-copy sends copied; plain sends from now on");
            }
        }
    }

    /// Finishes chunks whose zero-copy sends are all acknowledged. True if any finished.
    pub fn release_zc(&mut self) -> bool {
        self.tx.release_zc()
    }

    pub fn is_devmem(&self) -> bool {
        self.devmem.is_some()
    }

    /// One devmem send of the planned body: bytes sent and the zero-copy id.
    pub fn send_devmem(&mut self, body: &DevmemBody, counters: &Counters) -> Result<usize, Errno> {
        let Some(d) = self.devmem_tx.as_mut() else {
            return Err(Errno::EINVAL);
        };
        let n = d
            .send(body)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        Counters::bump(&counters.devmem_tx_sends, 1);
        Counters::bump(&counters.devmem_tx_bytes, n as u64);
        Ok(n)
    }

    /// Whether devmem sends wait for completions (the emulated NIC raises
    /// no EPOLLERR: the engine polls).
    pub fn devmem_tx_pending(&self) -> bool {
        self.devmem_tx.is_some() && self.tx.zc.tracker.outstanding() > 0
    }

    /// Reads the devmem socket's completions and finishes the jobs they
    /// cover. True if any finished.
    pub fn drain_devmem_tx(&mut self, counters: &Counters) -> Option<bool> {
        let d = self.devmem_tx.as_mut()?;
        let mut done = Vec::new();
        if let Err(e) = d.completions(&mut done) {
            self.fail(e);
            return Some(false);
        }
        for z in done {
            Counters::bump(&counters.devmem_tx_completed, z.count());
            self.zc_completed(
                zerocopy::Completion {
                    lo: z.lo,
                    hi: z.hi,
                    copied: z.copied,
                },
                counters,
            );
        }
        Some(self.release_zc())
    }

    /// One receive through the devmem socket into the chunk being
    /// received (header and body are read separately: each read asks for at
    /// most what its part still needs); see `devmem_rx` for where the
    /// payload goes and when its tokens go back.
    pub fn rx_devmem(&mut self, scratch: &mut Vec<u8>) -> Step {
        let Some(target) = self.rx_target(scratch) else {
            self.launch_devmem();
            return Step::Idle;
        };
        let Some(d) = self.devmem.as_mut() else {
            return Step::Idle;
        };
        let dst = match target {
            // SAFETY: the target is valid for writes while its placement holds the region.
            RxRoute::Host(p, len) => Dst::Host(unsafe { super::bytes_mut(p, len) }),
            RxRoute::Device(span) => Dst::Device(span),
        };
        match d.recv(dst) {
            Ok(Recv::Bytes(n)) => self.rx_done(n),
            Ok(Recv::Closed) => self.rx_done(0),
            Ok(Recv::WouldBlock) => {
                self.launch_devmem();
                return Step::WouldBlock;
            }
            Ok(Recv::Interrupted) => {}
            // A reset is the path's (or the peer's) end, as on a plain socket.
            Err(e @ Error::ConnectionLost(_)) => {
                self.lose(e);
                return Step::Idle;
            }
            Err(e) => {
                self.fail(e);
                return Step::Idle;
            }
        }
        Step::Moved
    }

    /// Starts the gathers staged so far: the socket pauses, so no more
    /// rows join them soon.
    fn launch_devmem(&mut self) {
        if let Some(Err(e)) = self.devmem.as_mut().map(|d| d.launch_open()) {
            self.fail(e);
        }
    }

    /// Where the next devmem receive goes: the rest of the chunk header,
    /// else the rest of the body: device memory when the pool and the region
    /// are on the same GPU, else host-addressable memory.
    fn rx_target(&mut self, scratch: &mut Vec<u8>) -> Option<RxRoute> {
        if !self.rx_ready() {
            return None;
        }
        let pool_gpu = self.devmem.as_ref().and_then(|d| d.gpu_ordinal());
        let Some(b) = self.rx.body.as_mut() else {
            let h = self.rx.hdr_done;
            return Some(RxRoute::Host(self.rx.hdr[h..].as_mut_ptr(), CHUNK_LEN - h));
        };
        let want = b.len - b.done;
        let target = match b.dst.as_ref() {
            None => {
                if scratch.is_empty() {
                    scratch.resize(SCRATCH_LEN, 0);
                }
                Ok(RxRoute::Host(scratch.as_mut_ptr(), want.min(scratch.len())))
            }
            Some(p) => rx_route(
                pool_gpu,
                &p.region,
                self.tx.lane,
                p.base + b.off + b.done as u64,
                want,
            ),
        };
        b.direct = matches!(target, Ok(RxRoute::Device(_)));
        match target {
            Ok(t) => Some(t),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    pub fn tx_failed(&mut self, e: Errno) {
        let err = self.io_error("send", e);
        self.lose(err);
    }

    pub fn rx_failed(&mut self, e: Errno) {
        let err = self.io_error("recv", e);
        self.lose(err);
    }

    /// ETIMEDOUT on a data socket is TCP_USER_TIMEOUT: the peer stopped acknowledging.
    fn io_error(&self, op: &'static str, e: Errno) -> Error {
        if e == Errno::ETIMEDOUT {
            Error::PeerUnresponsive {
                after_ms: self.peer_timeout_ms,
            }
        } else {
            Error::io(op, e.into())
        }
    }
}

/// The peer is this host: a loopback address, or our own.
fn to_this_host(s: &TcpStream) -> bool {
    match (s.peer_addr(), s.local_addr()) {
        (Ok(p), Ok(l)) => p.ip().is_loopback() || p.ip() == l.ip(),
        _ => false,
    }
}

/// Sets SO_ZEROCOPY; false (with a log line) where the kernel refuses it.
fn enable_zerocopy(s: &TcpStream) -> bool {
    match set_int_option(s, libc::SOL_SOCKET, zerocopy::SO_ZEROCOPY, 1) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("SO_ZEROCOPY refused ({e}); plain sends");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::devmem_rx::tests::{loaded, pattern, Manual};
    use crate::gpumemd::PoolSource;
    use crate::memory::{HostMemory, MemoryRegion};
    use crate::path::DevmemSpec;
    use crate::request::ReqState;
    use crate::stats::SockCounters;
    use devmem::sockabi::KernelAbi;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// Loopback peers and this host's own addresses are this host (where
    /// `auto` sends no zero-copy); tests/zerocopy.rs shows a veth peer is not.
    #[test]
    fn peers_on_this_host_are_recognised() {
        let connected = |ip: std::net::IpAddr| {
            let l = std::net::TcpListener::bind((ip, 0)).unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            assert!(to_this_host(&c), "{ip} is this host");
            assert!(to_this_host(&l.accept().unwrap().0), "{ip}, accepted side");
        };
        connected("127.0.0.1".parse().unwrap());
        connected("127.0.0.2".parse().unwrap());
        let own = nix::ifaddrs::getifaddrs().ok().and_then(|mut all| {
            all.find_map(|i| {
                let ip = std::net::IpAddr::V4(i.address?.as_sockaddr_in()?.ip());
                (!ip.is_loopback()).then_some(ip)
            })
        });
        match own {
            Some(ip) => connected(ip),
            None => eprintln!("no address besides loopback: own-address case not run"),
        }
    }

    /// A receive comm that knows one message, number 7.
    #[derive(Default)]
    struct OneMessage {
        placement: Mutex<Option<Arc<Placement>>>,
        err: Mutex<Option<Error>>,
    }

    impl CommLink for OneMessage {
        fn failed(&self, e: Error) {
            self.err.lock().unwrap().get_or_insert(e);
            self.placement.lock().unwrap().take();
        }
        fn lookup(&self, seq: u64) -> Lookup {
            match self.placement.lock().unwrap().clone() {
                Some(p) if seq == 7 => Lookup::Place(p),
                _ => Lookup::Discard,
            }
        }
        fn completed(&self, _: u64) {
            self.placement.lock().unwrap().take();
        }
        fn failure(&self) -> Error {
            self.err.lock().unwrap().clone().unwrap_or(Error::Closed)
        }
    }

    /// Receives one `n`-byte chunk through an emulated devmem socket whose
    /// gathers finish when `gather` says, calling `blocked` each time the
    /// socket would block (before it settles); returns the request and its
    /// memory.
    fn receive(
        gather: &Manual,
        deadline: Duration,
        n: usize,
        blocked: impl Fn(&ReqState),
    ) -> (Arc<ReqState>, MemoryRegion) {
        let mut wire = Chunk {
            seq: 7,
            offset: 0,
            len: n as u32,
        }
        .encode()
        .to_vec();
        wire.extend(pattern(n));
        let (stream, _peer) = loaded(&wire);
        // Idle sockets settle: a read that would block must say so at once.
        stream.set_nonblocking(true).unwrap();
        let mode = TxMode {
            zerocopy: ZeroCopy::Off,
            min_zcopy: 0,
            devmem: Some(DevmemSpec::Emulated {
                abi: KernelAbi::Tcpx,
                source: PoolSource::Local(1 << 20),
                poison: true,
            }),
            devmem_tx: None,
            peer_timeout_ms: 0,
            notsent_lowat: 0,
            quickack: false,
        };
        let comm = Arc::new(OneMessage::default());
        let mut s = Sock::new(
            stream,
            mode,
            comm.clone(),
            true,
            None,
            &Arc::new(Counters::default()),
            SockId { index: 0, gen: 0 },
            Arc::default(),
        );
        if let Some(d) = s.devmem.as_mut() {
            d.set_gather(Box::new(gather.clone()), deadline);
        }
        let mr = MemoryRegion::owned(HostMemory::zeroed(n).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Placement::new(
            7,
            mr.inner.clone(),
            0,
            n as u64,
            n as u64,
            req.clone(),
            comm.clone(),
        );
        *comm.placement.lock().unwrap() = Some(Arc::new(p));
        let mut scratch = Vec::new();
        while !req.is_done() {
            match s.rx_devmem(&mut scratch) {
                Step::Moved => {}
                Step::WouldBlock | Step::Idle => {
                    blocked(&req);
                    assert!(s.settle(), "stalled before the request was done")
                }
            }
        }
        (req, mr)
    }

    #[test]
    fn a_devmem_receive_is_done_only_once_its_unpack_finished() {
        // An unpack that never finishes: the request fails (typed), it
        // never reports success with bytes still in flight.
        let (req, _) = receive(
            &Manual::default(),
            Duration::from_millis(100),
            600_001,
            |_| {},
        );
        assert!(
            matches!(req.error(), Some(Error::Timeout { .. })),
            "{:?}",
            req.error()
        );

        // One that finishes later: done after it, byte-exact.
        let m = Manual::default();
        let finished = Arc::new(AtomicBool::new(false));
        let (m2, f2) = (m.clone(), finished.clone());
        let finisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            f2.store(true, Ordering::SeqCst);
            m2.finish_all();
        });
        let (req, mut mr) = receive(&m, Duration::from_secs(5), 600_001, |_| {});
        assert!(
            finished.load(Ordering::SeqCst),
            "done before the unpack finished"
        );
        assert_eq!(req.error(), None);
        finisher.join().unwrap();
        assert!(mr.bytes().unwrap() == &pattern(600_001)[..]);
    }

    #[test]
    fn a_devmem_socket_that_would_block_launches_its_open_batch() {
        let m = Manual::one_batch();
        m.finish_all();
        let launched = m.launched.clone();
        let (req, mut mr) = receive(&m, Duration::from_secs(5), 300_001, |req| {
            assert!(!req.is_done());
            assert!(
                launched.load(Ordering::SeqCst) > 0,
                "the staged gathers wait for a settle"
            );
        });
        assert_eq!(req.error(), None);
        assert!(mr.bytes().unwrap() == &pattern(300_001)[..]);
    }

    /// A receive comm for the plain path: message 3 (two chunks of 4096 in
    /// 6000 bytes) is known only after `announce`; below 3 is done.
    struct Late {
        placement: Mutex<Option<Arc<Placement>>>,
        known: AtomicBool,
        waits: std::sync::atomic::AtomicUsize,
        kicks: std::sync::atomic::AtomicU64,
        err: Mutex<Option<Error>>,
        /// What `sender_gone` says.
        gone: Mutex<Option<(Instant, Duration)>>,
        lost: std::sync::atomic::AtomicUsize,
    }

    impl Late {
        fn new(known: bool) -> Arc<Late> {
            Arc::new(Late {
                placement: Mutex::new(None),
                known: AtomicBool::new(known),
                waits: Default::default(),
                kicks: Default::default(),
                err: Mutex::new(None),
                gone: Mutex::new(None),
                lost: Default::default(),
            })
        }
    }

    /// Plain sends: no zero-copy, no devmem, no socket options.
    fn plain_mode() -> TxMode {
        TxMode {
            zerocopy: ZeroCopy::Off,
            min_zcopy: 0,
            devmem: None,
            devmem_tx: None,
            peer_timeout_ms: 0,
            notsent_lowat: 0,
            quickack: false,
        }
    }

    /// A receiving data socket with plain sends, socket `index` of `comm`.
    fn plain_rx(
        stream: std::net::TcpStream,
        comm: Arc<dyn CommLink>,
        index: u16,
        counters: Arc<SockCounters>,
    ) -> Sock {
        Sock::new(
            stream,
            plain_mode(),
            comm,
            true,
            None,
            &Arc::new(Counters::default()),
            SockId { index, gen: 0 },
            counters,
        )
    }

    impl CommLink for Late {
        fn failed(&self, e: Error) {
            self.err.lock().unwrap().get_or_insert(e);
        }
        fn lookup(&self, seq: u64) -> Lookup {
            match (seq, self.known.load(Ordering::SeqCst)) {
                (3, true) => self
                    .placement
                    .lock()
                    .unwrap()
                    .clone()
                    .map_or(Lookup::Discard, Lookup::Place),
                (3, false) | (4.., _) => Lookup::Unknown,
                _ => Lookup::Discard,
            }
        }
        fn wait_for(&self, _: u64, _: SockId) {
            self.waits.fetch_add(1, Ordering::SeqCst);
        }
        fn kicks(&self) -> u64 {
            self.kicks.load(Ordering::SeqCst)
        }
        fn completed(&self, _: u64) {
            self.placement.lock().unwrap().take();
        }
        fn lost(&self, _: SockId, _: Error) {
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
        fn sender_gone(&self) -> Option<(Instant, Duration)> {
            *self.gone.lock().unwrap()
        }
    }

    fn chunk(seq: u64, offset: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Chunk {
            seq,
            offset,
            len: body.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(body);
        v
    }

    /// Reads until the socket waits or has nothing; true if it read.
    fn pump(s: &mut Sock, scratch: &mut Vec<u8>) -> bool {
        use std::io::IoSliceMut;
        let mut moved = false;
        while let Some(plan) = s.rx_plan(scratch) {
            let [(p0, l0), (p1, l1)] = plan.parts;
            // SAFETY: the plan's parts are valid for writes while their placement holds the region.
            let mut iov = unsafe {
                [
                    IoSliceMut::new(crate::engine::bytes_mut(p0, l0)),
                    IoSliceMut::new(crate::engine::bytes_mut(p1, l1)),
                ]
            };
            match nix::sys::uio::readv(&s.stream, &mut iov) {
                Ok(n) => {
                    moved = true;
                    s.rx_done(n)
                }
                Err(_) => break,
            }
        }
        moved
    }

    #[test]
    fn chunks_wait_for_their_announcement_and_duplicates_and_old_ones_are_dropped() {
        let data = pattern(6000);
        let mut wire = chunk(1, 0, &[7; 100]); // an old message: dropped
        wire.extend(chunk(3, 4096, &data[4096..]));
        wire.extend(chunk(3, 4096, &[0xEE; 1904])); // a duplicate: dropped
        wire.extend(chunk(3, 0, &data[..4096]));
        let (stream, _peer) = loaded(&wire);
        stream.set_nonblocking(true).unwrap();
        let comm = Late::new(false);
        let mut s = plain_rx(stream, comm.clone(), 0, Arc::default());
        let mut mr = MemoryRegion::owned(HostMemory::zeroed(6000).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Placement::new(
            3,
            mr.inner.clone(),
            0,
            6000,
            4096,
            req.clone(),
            comm.clone(),
        );
        *comm.placement.lock().unwrap() = Some(Arc::new(p));
        let mut scratch = Vec::new();
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut scratch);
        assert_eq!(
            comm.waits.load(Ordering::SeqCst),
            1,
            "it asked the comm once"
        );
        assert!(s.rx_plan(&mut scratch).is_none(), "and waits");
        assert_eq!(comm.waits.load(Ordering::SeqCst), 1, "without asking again");
        comm.kicks.fetch_add(1, Ordering::SeqCst);
        assert!(s.rx_plan(&mut scratch).is_none());
        assert_eq!(
            comm.waits.load(Ordering::SeqCst),
            2,
            "a kick that did not bring it: ask again"
        );
        comm.known.store(true, Ordering::SeqCst);
        comm.kicks.fetch_add(1, Ordering::SeqCst);
        while !req.is_done() {
            assert!(pump(&mut s, &mut scratch), "stalled");
        }
        assert_eq!(req.error(), None);
        assert!(comm.err.lock().unwrap().is_none());
        assert!(mr.bytes().unwrap() == &data[..]);
    }

    #[test]
    fn a_chunk_off_the_message_geometry_fails_the_comm() {
        let (stream, _peer) = loaded(&chunk(3, 100, &[1; 50]));
        stream.set_nonblocking(true).unwrap();
        let comm = Late::new(true);
        let mut s = plain_rx(stream, comm.clone(), 0, Arc::default());
        let mr = MemoryRegion::owned(HostMemory::zeroed(6000).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Placement::new(
            3,
            mr.inner.clone(),
            0,
            6000,
            4096,
            req.clone(),
            comm.clone(),
        );
        *comm.placement.lock().unwrap() = Some(Arc::new(p));
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut Vec::new());
        assert!(matches!(
            *comm.err.lock().unwrap(),
            Some(Error::Protocol(_))
        ));
        assert!(s.dead.is_some());
    }

    #[test]
    fn a_copy_waits_while_another_socket_holds_its_chunk_and_takes_it_when_let_go() {
        let data = pattern(8192);
        let mut wire = chunk(3, 0, &data[..4096]);
        wire.extend(chunk(3, 0, &[0xEE; 4096])); // a late copy: dropped
        let (stream, _peer) = loaded(&wire);
        stream.set_nonblocking(true).unwrap();
        let comm = Late::new(true);
        let counters = Arc::new(SockCounters::default());
        let mut s = plain_rx(stream, comm.clone(), 1, counters.clone());
        let mut mr = MemoryRegion::owned(HostMemory::zeroed(8192).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Arc::new(Placement::new(
            3,
            mr.inner.clone(),
            0,
            8192,
            4096,
            req.clone(),
            comm.clone(),
        ));
        *comm.placement.lock().unwrap() = Some(p.clone());
        // Another socket (on a path now dead) began chunk 0 first.
        assert_eq!(p.claim(0, 4096).unwrap(), Claim::Mine);
        let mut scratch = Vec::new();
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut scratch);
        assert!(s.rx_plan(&mut scratch).is_none(), "the copy waits");
        assert_eq!(
            comm.waits.load(Ordering::SeqCst),
            1,
            "and has the control socket read (the retirement comes there)"
        );
        // That socket is retired: it lets go; this copy takes the chunk,
        // and the late copy after it is dropped.
        p.unclaim(0);
        pump(&mut s, &mut scratch);
        assert_eq!(p.placed_bits(), vec![0b01]);
        let c = counters.snapshot();
        assert_eq!((c.chunks_received, c.duplicates_dropped), (1, 1));
        // Chunk 1 comes on another socket.
        assert_eq!(p.claim(4096, 4096).unwrap(), Claim::Mine);
        p.chunk_placed(4096);
        drop(p);
        assert!(req.is_done() && req.error().is_none());
        assert!(
            mr.bytes().unwrap()[..4096] == data[..4096],
            "the first copy's bytes"
        );
    }

    #[test]
    fn a_socket_left_silent_by_a_gone_sender_ends_but_a_copy_waiting_on_it_does_not() {
        let data = pattern(4096);
        // Socket 0 got half of chunk 0 when its path died; socket 1 has a copy.
        let (half, _p0) = loaded(&chunk(3, 0, &data)[..CHUNK_LEN + 2000]);
        let (copy, _p1) = loaded(&chunk(3, 0, &data));
        let comm = Late::new(true);
        let sock = |stream: std::net::TcpStream, index| {
            stream.set_nonblocking(true).unwrap();
            plain_rx(stream, comm.clone(), index, Arc::default())
        };
        let (mut a, mut b) = (sock(half, 0), sock(copy, 1));
        let mut mr = MemoryRegion::owned(HostMemory::zeroed(4096).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let p = Placement::new(
            3,
            mr.inner.clone(),
            0,
            4096,
            4096,
            req.clone(),
            comm.clone(),
        );
        *comm.placement.lock().unwrap() = Some(Arc::new(p));
        let mut scratch = Vec::new();
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut a, &mut scratch);
        pump(&mut b, &mut scratch);
        assert!(
            b.rx_plan(&mut scratch).is_none(),
            "the copy waits for socket 0"
        );
        let t0 = Instant::now();
        for s in [&mut a, &mut b] {
            s.tick(t0);
        }
        let patience = Duration::from_millis(100);
        *comm.gone.lock().unwrap() = Some((t0, patience));
        for s in [&mut a, &mut b] {
            s.tick(t0 + patience / 2);
        }
        assert_eq!(comm.lost.load(Ordering::SeqCst), 0, "within its patience");
        for s in [&mut a, &mut b] {
            s.tick(t0 + patience * 2);
        }
        assert!(
            a.dead.is_some() && b.dead.is_none(),
            "only the silent one ends"
        );
        assert_eq!(comm.lost.load(Ordering::SeqCst), 1);
        // It let go of the chunk: the copy takes it.
        while !req.is_done() {
            assert!(pump(&mut b, &mut scratch), "stalled");
        }
        assert_eq!(req.error(), None);
        assert!(mr.bytes().unwrap() == &data[..]);
    }

    #[test]
    fn force_ack_sets_quick_ack_after_each_chunk() {
        for on in [false, true] {
            let (stream, _peer) = loaded(&chunk(3, 0, &pattern(6000)[..4096]));
            stream.set_nonblocking(true).unwrap();
            // Delayed-ACK mode, as the kernel has it after a while.
            SockRef::from(&stream).set_quickack(false).unwrap();
            let comm = Late::new(true);
            let mode = TxMode {
                zerocopy: ZeroCopy::Off,
                min_zcopy: 0,
                devmem: None,
                devmem_tx: None,
                peer_timeout_ms: 0,
                notsent_lowat: 0,
                quickack: on,
            };
            let mut s = Sock::new(
                stream,
                mode,
                comm.clone(),
                true,
                None,
                &Arc::new(Counters::default()),
                SockId { index: 0, gen: 0 },
                Arc::new(SockCounters::default()),
            );
            let mr = MemoryRegion::owned(HostMemory::zeroed(6000).unwrap());
            let req = Arc::new(ReqState::new(1, 1));
            let p = Placement::new(3, mr.inner.clone(), 0, 6000, 4096, req, comm.clone());
            *comm.placement.lock().unwrap() = Some(Arc::new(p));
            std::thread::sleep(Duration::from_millis(20));
            pump(&mut s, &mut Vec::new());
            assert_eq!(
                SockRef::from(&s.stream).quickack().unwrap(),
                on,
                "force_ack {on}"
            );
        }
    }
}
