//! Counters the workers keep, readable through `Net::stats()`.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

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
