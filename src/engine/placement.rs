//! Where received chunks go. A receive comm tells its data sockets, through
//! [`CommLink`], which message each chunk belongs to; the sockets place a
//! chunk by its header `(seq, offset)`, whatever socket it arrives on, one
//! copy at a time ([`Placement::claim`]).
//!
//! A [`Placement`] is one accepted chunked message. Its request piece
//! completes when the last reference to it goes, after its region
//! reference: successfully if every chunk is in place, else (the comm
//! failed first) with the comm's error. Only then can nothing in the
//! transport still write its buffer.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::link::CommLink;
use crate::error::{Error, Result};
use crate::memory::Region;
use crate::request::ReqState;

pub(crate) struct Placement {
    pub seq: u64,
    pub region: Arc<Region>,
    /// Offset of the message in the region.
    pub base: u64,
    pub size: u64,
    pub chunk_size: u64,
    /// One bit per chunk: a socket receives it (or did).
    claimed: Vec<AtomicU64>,
    /// One bit per chunk: in place.
    placed: Vec<AtomicU64>,
    /// A socket waits for a chunk another one holds.
    waiting: AtomicBool,
    /// Declared last: dropped after `region`.
    done: Completion,
}

/// What a socket may do with a chunk it is about to receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// It receives the chunk into the message's buffer.
    Mine,
    /// The chunk is in place already: read and drop this copy.
    Done,
    /// Another socket is receiving it: wait until that one finishes (then
    /// `Done`) or lets go (its socket failed or was retired: then `Mine`).
    Held,
}

/// Reports a placement's request piece once the placement is gone.
struct Completion {
    /// Chunks not yet in place.
    remaining: AtomicU64,
    req: Arc<ReqState>,
    comm: Arc<dyn CommLink>,
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.remaining.load(Ordering::Acquire) == 0 {
            self.req.piece_done();
        } else {
            self.req.fail(self.comm.failure());
        }
    }
}

fn bit(k: u64) -> (usize, u64) {
    ((k / 64) as usize, 1u64 << (k % 64))
}

impl Placement {
    pub fn new(
        seq: u64,
        region: Arc<Region>,
        base: u64,
        size: u64,
        chunk_size: u64,
        req: Arc<ReqState>,
        comm: Arc<dyn CommLink>,
    ) -> Self {
        let n = size.div_ceil(chunk_size.max(1));
        let words = || (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Placement {
            seq,
            region,
            base,
            size,
            chunk_size,
            claimed: words(),
            placed: words(),
            waiting: AtomicBool::new(false),
            done: Completion {
                remaining: AtomicU64::new(n),
                req,
                comm,
            },
        }
    }

    /// Checks a chunk header against the message and claims the chunk.
    /// Only one socket at a time receives a chunk into the buffer, so a
    /// copy never writes over bytes of a finished request: a later copy
    /// is dropped once the chunk is in place, and waits while another
    /// socket holds it (that socket may be stuck on a dead path until the
    /// sender retires it; then the chunk is free again).
    pub fn claim(&self, offset: u64, len: u32) -> Result<Claim> {
        let cs = self.chunk_size;
        let ok = offset % cs == 0 && offset < self.size && len as u64 == cs.min(self.size - offset);
        if !ok {
            return Err(Error::Protocol(format!(
                "chunk {offset}+{len} of message {} ({} bytes in chunks of {cs})",
                self.seq, self.size
            )));
        }
        let (w, b) = bit(offset / cs);
        if self.claimed[w].fetch_or(b, Ordering::SeqCst) & b == 0 {
            return Ok(Claim::Mine);
        }
        // Told before it looks again: a holder that lets go or finishes
        // after this sees the flag and wakes the waiters.
        self.waiting.store(true, Ordering::SeqCst);
        if self.placed[w].load(Ordering::SeqCst) & b != 0 {
            return Ok(Claim::Done);
        }
        if self.claimed[w].fetch_or(b, Ordering::SeqCst) & b == 0 {
            return Ok(Claim::Mine);
        }
        Ok(Claim::Held)
    }

    /// Length of the chunk at `offset`.
    pub fn chunk_len(&self, offset: u64) -> u64 {
        (self.size - offset).min(self.chunk_size)
    }

    /// A claimed chunk whose receive failed may come again (on another socket).
    pub fn unclaim(&self, offset: u64) {
        let (w, b) = bit(offset / self.chunk_size);
        self.claimed[w].fetch_and(!b, Ordering::SeqCst);
        self.wake();
    }

    /// The claimed chunk at `offset` is in place (landed and settled). The
    /// last one tells the comm, which lets go of the placement.
    pub fn chunk_placed(&self, offset: u64) {
        let (w, b) = bit(offset / self.chunk_size);
        self.placed[w].fetch_or(b, Ordering::SeqCst);
        if self.done.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.comm.completed(self.seq);
        }
        self.wake();
    }

    fn wake(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            self.done.comm.wake();
        }
    }

    /// The chunks in place: bit `k % 8` of byte `k / 8` for chunk `k`.
    pub fn placed_bits(&self) -> Vec<u8> {
        let n = self.size.div_ceil(self.chunk_size) as usize;
        let mut out = vec![0u8; n.div_ceil(8)];
        for (w, word) in self.placed.iter().enumerate() {
            let v = word.load(Ordering::SeqCst).to_le_bytes();
            for (i, byte) in v.iter().enumerate() {
                if let Some(o) = out.get_mut(w * 8 + i) {
                    *o = *byte;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{HostMemory, MemoryRegion};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<u64>>, std::sync::atomic::AtomicUsize);
    impl CommLink for Log {
        fn failed(&self, _: Error) {}
        fn completed(&self, seq: u64) {
            self.0.lock().unwrap().push(seq);
        }
        fn failure(&self) -> Error {
            Error::ConnectionLost("test".into())
        }
        fn wake(&self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn placement(size: u64, cs: u64) -> (Placement, Arc<ReqState>, Arc<Log>) {
        let mr = MemoryRegion::owned(HostMemory::zeroed(size as usize).unwrap());
        let req = Arc::new(ReqState::new(1, 1));
        let log = Arc::new(Log::default());
        let p = Placement::new(4, mr.inner.clone(), 0, size, cs, req.clone(), log.clone());
        (p, req, log)
    }

    #[test]
    fn chunks_are_checked_and_one_copy_at_a_time_is_received() {
        let (p, req, log) = placement(10_000, 4096);
        assert_eq!(p.claim(4096, 4096).unwrap(), Claim::Mine);
        assert_eq!(
            p.claim(4096, 4096).unwrap(),
            Claim::Held,
            "a copy waits while the first is being received"
        );
        for (off, len) in [(1, 4096), (8192, 4096), (12288, 1), (0, 100)] {
            assert!(
                matches!(p.claim(off, len), Err(Error::Protocol(_))),
                "{off}+{len}"
            );
        }
        assert_eq!(p.claim(0, 4096).unwrap(), Claim::Mine);
        assert_eq!(p.claim(8192, 1808).unwrap(), Claim::Mine);
        p.chunk_placed(4096);
        assert_eq!(log.1.load(Ordering::SeqCst), 1, "the waiter is woken");
        assert_eq!(
            p.claim(4096, 4096).unwrap(),
            Claim::Done,
            "then the copy is dropped"
        );
        assert_eq!(p.placed_bits(), vec![0b010]);
        p.chunk_placed(0);
        p.chunk_placed(8192);
        assert_eq!(p.placed_bits(), vec![0b111]);
        assert_eq!(*log.0.lock().unwrap(), vec![4], "the comm learns at once");
        assert!(!req.is_done(), "done only once nobody holds the region");
        drop(p);
        assert!(req.is_done() && req.error().is_none());
    }

    #[test]
    fn a_chunk_let_go_by_a_dead_socket_goes_to_the_copy_that_waited() {
        let (p, _req, log) = placement(1 << 20, 4096);
        assert_eq!(p.claim(0, 4096).unwrap(), Claim::Mine);
        assert_eq!(p.claim(0, 4096).unwrap(), Claim::Held);
        // The first socket's path died mid-chunk (it was retired).
        p.unclaim(0);
        assert_eq!(log.1.load(Ordering::SeqCst), 1);
        assert_eq!(p.claim(0, 4096).unwrap(), Claim::Mine);
        assert_eq!(p.claim(0, 4096).unwrap(), Claim::Held);
        p.chunk_placed(0);
        assert_eq!(p.claim(0, 4096).unwrap(), Claim::Done);
        // Bits beyond 64 chunks land in the right bytes.
        assert_eq!(p.claim(4096 * 70, 4096).unwrap(), Claim::Mine);
        p.chunk_placed(4096 * 70);
        let bits = p.placed_bits();
        assert_eq!(bits.len(), 32);
        assert_eq!((bits[0], bits[8]), (1, 0b0100_0000));
    }

    #[test]
    fn racing_copies_place_each_chunk_once() {
        // Two "sockets" race over every chunk; each either receives it,
        // drops it, or waits and looks again: every chunk is placed once.
        let (p, req, _) = placement(4096 * 500, 4096);
        let p = Arc::new(p);
        let placed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (p, placed) = (p.clone(), placed.clone());
                std::thread::spawn(move || {
                    for k in 0..500u64 {
                        loop {
                            match p.claim(k * 4096, 4096).unwrap() {
                                Claim::Mine => {
                                    placed.fetch_add(1, Ordering::SeqCst);
                                    p.chunk_placed(k * 4096);
                                    break;
                                }
                                Claim::Done => break,
                                Claim::Held => std::thread::yield_now(),
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(placed.load(Ordering::SeqCst), 500);
        drop(p);
        assert!(req.is_done() && req.error().is_none());
    }

    #[test]
    fn an_incomplete_placement_fails_its_request_when_the_last_reference_goes() {
        let (p, req, _) = placement(10_000, 4096);
        let p = Arc::new(p);
        let held = p.clone();
        p.chunk_placed(0);
        drop(p);
        assert!(!req.is_done(), "a socket still holds it: not done");
        drop(held);
        assert!(req.is_done());
        assert_eq!(req.error(), Some(Error::ConnectionLost("test".into())));
    }
}
