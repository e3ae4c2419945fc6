//! Counters the workers keep, readable through `Net::stats()`, and per
//! data socket and NIC (`SendComm::socket_stats`, `Net::nic_stats`).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub zc_sends: AtomicU64,
    pub zc_enobufs: AtomicU64,
    pub zc_copied: AtomicU64,
    pub zc_acked: AtomicU64,
    pub zc_switched_off: AtomicU64,
    pub devmem_frags: AtomicU64,
    pub devmem_tokens_received: AtomicU64,
    pub devmem_tokens_returned: AtomicU64,
    pub devmem_token_double_returns: AtomicU64,
    pub devmem_tokens_unfreed: AtomicU64,
    pub devmem_dontneed_calls: AtomicU64,
    pub devmem_linear_bytes: AtomicU64,
    pub devmem_kernels: AtomicU64,
    pub devmem_tx_sends: AtomicU64,
    pub devmem_tx_bytes: AtomicU64,
    pub devmem_tx_completed: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            zerocopy_sends: g(&self.zc_sends),
            zerocopy_enobufs_fallbacks: g(&self.zc_enobufs),
            zerocopy_reported_copied: g(&self.zc_copied),
            zerocopy_reported_zero_copy: g(&self.zc_acked),
            sockets_switched_to_plain: g(&self.zc_switched_off),
            devmem_fragments: g(&self.devmem_frags),
            devmem_tokens_received: g(&self.devmem_tokens_received),
            devmem_tokens_returned: g(&self.devmem_tokens_returned),
            devmem_tokens_outstanding: g(&self.devmem_tokens_received)
                .saturating_sub(g(&self.devmem_tokens_returned)),
            devmem_token_double_returns: g(&self.devmem_token_double_returns),
            devmem_tokens_unfreed: g(&self.devmem_tokens_unfreed),
            devmem_dontneed_calls: g(&self.devmem_dontneed_calls),
            devmem_linear_bytes: g(&self.devmem_linear_bytes),
            devmem_unpack_kernels: g(&self.devmem_kernels),
            devmem_tx_sends: g(&self.devmem_tx_sends),
            devmem_tx_bytes: g(&self.devmem_tx_bytes),
            devmem_tx_completed: g(&self.devmem_tx_completed),
        }
    }
}

/// What the data path did so far (all comms of a `Net`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Successful `sendmsg(MSG_ZEROCOPY)` calls.
    pub zerocopy_sends: u64,
    /// Zero-copy sends refused with ENOBUFS (optmem limit) and sent by copying instead.
    pub zerocopy_enobufs_fallbacks: u64,
    /// Completions for which the kernel reported it copied after all.
    pub zerocopy_reported_copied: u64,
    /// Completions that were truly zero-copy.
    pub zerocopy_reported_zero_copy: u64,
    /// Sockets that `auto` mode moved to plain sends.
    pub sockets_switched_to_plain: u64,
    /// Pool fragments received through devmem sockets (kernel or emulated).
    pub devmem_fragments: u64,
    /// Tokens the NIC lent (one per pool fragment).
    pub devmem_tokens_received: u64,
    /// Tokens given back (`SO_DEVMEM_DONTNEED`), each once.
    pub devmem_tokens_returned: u64,
    /// Tokens lent and not yet given back (gathers still reading them).
    pub devmem_tokens_outstanding: u64,
    /// Returns of a token not held, caught before reaching the kernel (a bug if not 0).
    pub devmem_token_double_returns: u64,
    /// Tokens an upstream kernel said it did not free (it did not hold them).
    pub devmem_tokens_unfreed: u64,
    /// `SO_DEVMEM_DONTNEED` calls that returned them.
    pub devmem_dontneed_calls: u64,
    /// Bytes that landed in the linear buffer (header-split misses).
    pub devmem_linear_bytes: u64,
    /// Receives gathered by the CUDA unpack kernel (GPU pool into CUDA memory).
    pub devmem_unpack_kernels: u64,
    /// Devmem sends (`sendmsg(MSG_ZEROCOPY)` with a devmem TX cmsg).
    pub devmem_tx_sends: u64,
    /// Bytes they sent.
    pub devmem_tx_bytes: u64,
    /// Devmem sends the NIC reported done (error-queue completions).
    pub devmem_tx_completed: u64,
}

/// Counts of one data socket, or of every data socket of one NIC.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    bytes_sent: AtomicU64,
    chunks_sent: AtomicU64,
    bytes_received: AtomicU64,
    chunks_received: AtomicU64,
    resent_chunks: AtomicU64,
    duplicates_dropped: AtomicU64,
    stalls: AtomicU64,
    failures: AtomicU64,
    reconnects: AtomicU64,
}

impl Tally {
    pub fn snapshot(&self) -> PathStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PathStats {
            bytes_sent: g(&self.bytes_sent),
            chunks_sent: g(&self.chunks_sent),
            bytes_received: g(&self.bytes_received),
            chunks_received: g(&self.chunks_received),
            resent_chunks: g(&self.resent_chunks),
            duplicates_dropped: g(&self.duplicates_dropped),
            stalls: g(&self.stalls),
            failures: g(&self.failures),
            reconnects: g(&self.reconnects),
        }
    }
}

/// A data socket's tally and its NIC's: each count goes to both.
#[derive(Debug, Default)]
pub(crate) struct SockCounters {
    own: Tally,
    nic: Arc<Tally>,
}

impl SockCounters {
    pub fn new(nic: Arc<Tally>) -> Self {
        SockCounters {
            own: Tally::default(),
            nic,
        }
    }

    fn both(&self, f: impl Fn(&Tally) -> &AtomicU64, n: u64) {
        f(&self.own).fetch_add(n, Ordering::Relaxed);
        f(&self.nic).fetch_add(n, Ordering::Relaxed);
    }

    /// A chunk of `bytes` went out (`again`: a re-send or a copy).
    pub fn sent(&self, bytes: u64, again: bool) {
        self.both(|t| &t.bytes_sent, bytes);
        self.both(|t| &t.chunks_sent, 1);
        if again {
            self.both(|t| &t.resent_chunks, 1);
        }
    }

    /// A chunk of `bytes` was placed.
    pub fn received(&self, bytes: u64) {
        self.both(|t| &t.bytes_received, bytes);
        self.both(|t| &t.chunks_received, 1);
    }

    /// A copy of a chunk already in place was read and dropped.
    pub fn dropped_copy(&self) {
        self.both(|t| &t.duplicates_dropped, 1);
    }

    pub fn stalled(&self) {
        self.both(|t| &t.stalls, 1);
    }

    pub fn failed(&self) {
        self.both(|t| &t.failures, 1);
    }

    pub fn reconnected(&self) {
        self.both(|t| &t.reconnects, 1);
    }

    pub fn snapshot(&self) -> PathStats {
        self.own.snapshot()
    }
}

/// What data sockets did: one socket's, or a NIC's (all its sockets').
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PathStats {
    /// Payload bytes of chunks written (copies and re-sends included).
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    /// Payload bytes of chunks placed (dropped copies not included).
    pub bytes_received: u64,
    pub chunks_received: u64,
    /// Chunks sent again: after a socket was retired, or as a copy of a
    /// message's tail held up on a slower socket.
    pub resent_chunks: u64,
    /// Copies of chunks already in place, read and dropped.
    pub duplicates_dropped: u64,
    /// Sockets retired because they stalled while others moved.
    pub stalls: u64,
    /// Sockets retired because they failed (an error, the peer's reset).
    pub failures: u64,
    /// Retired sockets connected again.
    pub reconnects: u64,
}

/// One data socket of a comm (`SendComm::socket_stats`, `RecvComm::socket_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SocketStats {
    /// Index of the socket in its comm (as in the handshake).
    pub index: usize,
    /// Device (NIC) the socket uses.
    pub nic: usize,
    /// In use (false: retired, and not connected again yet).
    pub live: bool,
    /// How many times it was connected again.
    pub generation: u32,
    #[serde(flatten)]
    pub counts: PathStats,
}

/// One NIC: every data socket of every comm on it, since init (`Net::nic_stats`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NicStats {
    pub nic: usize,
    pub name: String,
    #[serde(flatten)]
    pub counts: PathStats,
}
