//! How a data socket talks to its comm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::placement::Placement;
use super::tx::{SockId, TxChunk};
use crate::error::Error;

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
    /// The comm fails with `e` (the peer broke the protocol, or the data
    /// path failed locally).
    fn failed(&self, e: Error);
    /// The socket's path failed (an error, the peer closed it): the comm
    /// goes on without it.
    fn lost(&self, _id: SockId, _e: Error) {}
    /// Where chunks of message `seq` go (receive comms).
    fn lookup(&self, _seq: u64) -> Lookup {
        Lookup::Discard
    }
    /// Socket `id` waits for message `seq`: read the control socket, and
    /// kick the worker of each waiting socket once more messages are known.
    fn wait_for(&self, _seq: u64, _id: SockId) {}
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
    /// Once the sender is gone (its Bye, or its control socket's end):
    /// since when, and how long a receiving socket may then go without a
    /// byte (waiting for bytes, not for another socket) before it counts as
    /// ended: nobody will retire a socket whose path died with its bytes.
    fn sender_gone(&self) -> Option<(Instant, Duration)> {
        None
    }
    /// A chunk another socket waited for was placed or let go: sockets
    /// that wait for one look again.
    fn wake(&self) {}
    /// The next chunk for sending socket `id`, whose stream ends at `end`
    /// and was acknowledged by the peer up to `acked` (send comms).
    fn pull(&self, _id: SockId, _acked: u64, _end: u64, _now: Instant) -> Option<TxChunk> {
        None
    }
    /// A sending socket's periodic report (as `pull`'s).
    fn sample(&self, _id: SockId, _acked: u64, _end: u64, _now: Instant) {}
    /// A sending socket wrote: its stream as `pull` describes it, for the
    /// comm to see when another socket asks (no lock taken).
    fn publish(&self, _id: SockId, _acked: u64, _end: u64) {}
    /// Changes whenever a pull that found nothing might now find a chunk:
    /// an idle socket asks again only then (or at its next tick).
    fn epoch(&self) -> u64 {
        0
    }
}
