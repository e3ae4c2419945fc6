//! The control protocol of a comm, sans I/O (docs/PROTOCOL.md): bytes and
//! events in, actions out. No sockets, no locks, no threads: the comm types
//! (`crate::comm`) own those and drive one [`SendSide`] or [`RecvSide`]
//! each. Tested here on an in-memory pair of endpoints.
//!
//! Data flows only for posted receives: the receiver tells the sender each
//! receive it posts (Post), both ends match messages to receives with the
//! same [`matcher`], and a chunked message's chunks leave only once the
//! sender knows the receive that takes it. Small messages travel inline on
//! the control socket at once, within an eager window. Both ends send
//! heartbeats and give up on a silent peer ([`liveness`]).

#![forbid(unsafe_code)]

pub(crate) mod frame;
pub(crate) mod liveness;
pub(crate) mod matcher;
mod recv;
pub(crate) mod sched;
mod send;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub(crate) use recv::{RecvEvent, RecvSide};
pub(crate) use send::{SendEvent, SendSide};

/// A request of the comm layer, as the protocol knows it.
pub(crate) type Token = u64;

/// A map keyed by numbers this end hands out in order (tokens, its own
/// message numbers): a peer cannot choose them, so a multiplicative hash
/// serves instead of SipHash, which cost a tenth of a small message's
/// user time.
pub(crate) type OwnMap<V> = std::collections::HashMap<u64, V, BuildOwnHasher>;

pub(crate) type BuildOwnHasher = std::hash::BuildHasherDefault<OwnHasher>;

/// Fibonacci hashing of one u64 (high bits well mixed, as hashbrown's
/// control bytes need).
#[derive(Default)]
pub(crate) struct OwnHasher(u64);

impl std::hash::Hasher for OwnHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Bytes of inline messages a sender may have announced that no receive
/// took yet (a protocol constant: the receiver holds that much at most).
pub(crate) const EAGER_WINDOW: usize = 1 << 20;

/// What an inline message costs against the eager window (empty ones too).
pub(crate) fn eager_cost(size: u64) -> usize {
    (size as usize).max(64)
}

/// Most receives posted and not yet matched (the largest `TCPX_MAX_REQUESTS`).
pub(crate) const MAX_OPEN_POSTS: usize = 1024;

/// Settings of one end, from the config and the handshake.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Our peer timeout (`None`: never give up on the peer).
    pub timeout: Option<Duration>,
    /// The peer's, from the handshake: our heartbeats must satisfy it.
    pub peer_timeout: Option<Duration>,
    /// The sender's inline threshold: larger messages are chunked unless
    /// they travel alone.
    pub inline_threshold: usize,
    /// The largest inline message the receiver accepts.
    pub inline_max: usize,
}

/// Feeds `data` to a fresh sender and receiver as what their peers sent
/// (the first byte picks the read size), with receives posted and
/// messages sent in between; for the fuzz target and tests.
pub(crate) fn feed_both(data: &[u8]) {
    use std::time::{Duration, Instant};
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let step = 1 + cut as usize;
    let now = Instant::now();
    let p = Params {
        timeout: Some(Duration::from_secs(1)),
        peer_timeout: Some(Duration::from_secs(1)),
        inline_threshold: 65536,
        inline_max: 256 << 10,
    };
    let mut s = SendSide::new(p, now);
    let mut r = RecvSide::new(p, now);
    let _ = s.send_chunked(0, 1 << 20, 1, 4096, &mut |_| {});
    let _ = s.send_inline(1, 2, b"hi", &mut |_| {});
    let _ = r.post(0, &[(1 << 20, 1), (10, 2)], &mut |_| {});
    for (i, piece) in rest.chunks(step).enumerate() {
        let room = s.inbox_space();
        let n = room.len().min(piece.len());
        room[..n].copy_from_slice(&piece[..n]);
        s.received(n, now, &mut |_| {});
        let room = r.inbox_space();
        let n = room.len().min(piece.len());
        room[..n].copy_from_slice(&piece[..n]);
        r.received(n, now, &mut |_| {});
        if i % 3 == 0 {
            let _ = r.post(i as u64, &[(100, 1)], &mut |_| {});
            r.placed(i as u64);
        }
        if i % 5 == 1 {
            s.retire(i as u16, 0);
            r.report(0, &[0xff, 1]);
        }
        let t = now + Duration::from_millis(i as u64 * 300);
        s.poll(t);
        r.poll(t, true);
        let n = s.output().len();
        s.wrote(n, t, &mut |_| {});
        let n = r.output().len();
        r.wrote(n, t);
    }
}
