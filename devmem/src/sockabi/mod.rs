//! The kernel devmem socket ABI: cmsgs, fragments and token return for TCPX and upstream kernels.
//!
//! Sans-I/O where it can be: [`rx`] parses and builds the control buffer of
//! `recvmsg(MSG_SOCK_DEVMEM)`, [`tokens`] coalesces and serialises the token
//! ranges given back with `SO_DEVMEM_DONTNEED`, [`tx`] builds the devmem
//! TX cmsg of each ABI and [`errqueue`] reads its zero-copy completions.
//! [`socket`] is the syscall-level seam ([`DevmemSocket`]) those calls go
//! through, [`sys`] its kernel implementation (the emulated NIC in
//! `crate::emu` is the other). [`abi`] holds every constant, each pinned by
//! a test against the source it came from.
//!
//! Layouts are those of x86-64 Linux (`cmsghdr` is 16 bytes, 8-byte
//! `CMSG_ALIGN`), in host byte order, as the kernel writes them.

pub mod abi;
pub mod cmsg;
mod error;
pub mod errqueue;
#[doc(hidden)]
pub mod fuzzing;
pub mod rx;
pub mod socket;
pub mod sys;
pub mod tokens;
pub mod tx;

pub use abi::KernelAbi;
pub use error::AbiError;
pub use errqueue::{encode_zerocopy, parse_errqueue, ErrRecord, ZcRange};
pub use rx::{
    control_buffer_len, control_buffer_len_for, encode_rx, parse_rx, parse_rx_into, salvage_tokens,
    Fragment, Fragments,
};
pub use socket::{DevmemSocket, TxIov};
pub use sys::{kernel_abi, probe_abi, KernelSocket, RecvOutcome};
pub use tokens::{
    batch_ranges, coalesce_tokens, decode_token_ranges, encode_token_ranges, release_tokens,
    return_token_batch, DontNeedOutcome, ReleaseReport, TokenRange,
};
pub use tx::{decode_tx, encode_tx, TxCmsg, TxTarget};
