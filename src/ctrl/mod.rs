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

pub(crate) mod frame;
pub(crate) mod liveness;
pub(crate) mod matcher;
mod recv;
mod send;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub(crate) use recv::{RecvEvent, RecvSide};
pub(crate) use send::{SendEvent, SendSide};

/// A request of the comm layer, as the protocol knows it.
pub(crate) type Token = u64;

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
    /// The sender's inline threshold: larger messages are chunked.
    pub inline_threshold: usize,
}
