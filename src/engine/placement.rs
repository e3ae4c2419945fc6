//! Where received chunks go. A receive comm tells its data sockets, through
//! [`RxOwner`], which message each chunk belongs to; the sockets place a
//! chunk by its header `(seq, offset)`, whatever socket it arrives on.
//!
//! A [`Placement`] is one accepted chunked message. Its request piece
//! completes when the last reference to it goes, after its region
//! reference: successfully if every chunk is in place, else (the comm
//! failed first) with the comm's error. Only then can nothing in the
//! transport still write its buffer.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::memory::Region;
use crate::request::ReqState;

/// What a data socket learns about the chunk it is about to receive.
pub(crate) enum Lookup {
    Place(Arc<Placement>),
    /// A message that is complete or was refused: read and drop the bytes.
    Discard,
    /// Not announced yet on the control socket: wait for it.
    Unknown,
}

/// The comm behind a data socket.
pub(crate) trait CommLink: Send + Sync {
    /// The socket failed: the comm fails with `e`.
    fn failed(&self, e: Error);
    /// Where chunks of message `seq` go (receive comms).
    fn lookup(&self, _seq: u64) -> Lookup {
        Lookup::Discard
    }
    /// A socket waits for message `seq`: read the control socket, and kick
    /// the comm's workers once more messages are known.
    fn wait_for(&self, _seq: u64) {}
    /// How many times the comm kicked its workers: a waiting socket asks
    /// again (`wait_for`) only after a kick that did not bring its message.
    fn kicks(&self) -> u64 {
        0
    }
    /// Every chunk of `seq` is in place.
    fn completed(&self, _seq: u64) {}
    /// The error a placement reports if the comm failed before it completed.
    fn failure(&self) -> Error {
        Error::Closed
    }
}

pub(crate) struct Placement {
    pub seq: u64,
    pub region: Arc<Region>,
    /// Offset of the message in the region.
    pub base: u64,
    pub size: u64,
    pub chunk_size: u64,
    /// One bit per chunk: claimed by a socket (a duplicate is dropped).
    claimed: Vec<AtomicU64>,
    /// Declared last: dropped after `region`.
    done: Completion,
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
        Placement {
            seq,
            region,
            base,
            size,
            chunk_size,
            claimed: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            done: Completion {
                remaining: AtomicU64::new(n),
                req,
                comm,
            },
        }
    }

    /// Checks a chunk header against the message and claims the chunk;
    /// `Ok(false)` when another socket claimed it already (a duplicate).
    pub fn claim(&self, offset: u64, len: u32) -> Result<bool> {
        let cs = self.chunk_size;
        let ok = offset % cs == 0 && offset < self.size && len as u64 == cs.min(self.size - offset);
        if !ok {
            return Err(Error::Protocol(format!(
                "chunk {offset}+{len} of message {} ({} bytes in chunks of {cs})",
                self.seq, self.size
            )));
        }
        let k = offset / cs;
        let bit = 1u64 << (k % 64);
        let prev = self.claimed[(k / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        Ok(prev & bit == 0)
    }

    /// A claimed chunk whose receive failed may come again (on another socket).
    pub fn unclaim(&self, offset: u64) {
        let k = offset / self.chunk_size;
        let bit = 1u64 << (k % 64);
        self.claimed[(k / 64) as usize].fetch_and(!bit, Ordering::AcqRel);
    }

    /// One claimed chunk is in place (landed and settled). The last one
    /// tells the comm, which lets go of the placement.
    pub fn chunk_placed(&self) {
        if self.done.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.comm.completed(self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{HostMemory, MemoryRegion};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<u64>>);
    impl CommLink for Log {
        fn failed(&self, _: Error) {}
        fn completed(&self, seq: u64) {
            self.0.lock().unwrap().push(seq);
        }
        fn failure(&self) -> Error {
            Error::ConnectionLost("test".into())
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
    fn chunks_are_checked_and_claimed_once() {
        let (p, req, log) = placement(10_000, 4096);
        assert!(p.claim(4096, 4096).unwrap());
        assert!(!p.claim(4096, 4096).unwrap(), "a duplicate is dropped");
        for (off, len) in [(1, 4096), (8192, 4096), (12288, 1), (0, 100)] {
            assert!(
                matches!(p.claim(off, len), Err(Error::Protocol(_))),
                "{off}+{len}"
            );
        }
        assert!(p.claim(0, 4096).unwrap() && p.claim(8192, 1808).unwrap());
        p.chunk_placed();
        p.chunk_placed();
        p.chunk_placed();
        assert_eq!(*log.0.lock().unwrap(), vec![4], "the comm learns at once");
        assert!(!req.is_done(), "done only once nobody holds the region");
        drop(p);
        assert!(req.is_done() && req.error().is_none());
    }

    #[test]
    fn an_incomplete_placement_fails_its_request_when_the_last_reference_goes() {
        let (p, req, _) = placement(10_000, 4096);
        let p = Arc::new(p);
        let held = p.clone();
        p.chunk_placed();
        drop(p);
        assert!(!req.is_done(), "a socket still holds it: not done");
        drop(held);
        assert!(req.is_done());
        assert_eq!(req.error(), Some(Error::ConnectionLost("test".into())));
    }
}
