#![forbid(unsafe_code)]

use super::KernelAbi;

/// Errors of the devmem socket ABI layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbiError {
    /// `MSG_CTRUNC`: some fragment descriptors were dropped by the kernel.
    #[error(
        "recvmsg truncated the devmem control data ({len} bytes given); \
         size the buffer with control_buffer_len(max_frags) and give back the \
         tokens salvage_tokens() finds before closing this connection"
    )]
    ControlTruncated {
        /// Control bytes the kernel wrote.
        len: usize,
    },
    /// A `cmsghdr` is cut short or its `cmsg_len` runs past the buffer.
    #[error(
        "malformed cmsg at byte {offset}: {reason}; the control buffer does \
         not hold what the kernel wrote (pass exactly msg_controllen bytes)"
    )]
    Malformed {
        /// Offset of the bad header in the control buffer.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A fragment cmsg whose payload is shorter than the ABI's struct.
    #[error(
        "{abi} devmem cmsg type {ty} at byte {offset} carries {len} payload \
         bytes, expected at least {expected}; the kernel speaks another ABI version"
    )]
    ShortPayload {
        /// ABI being parsed.
        abi: KernelAbi,
        /// cmsg type.
        ty: i32,
        /// Offset of the header.
        offset: usize,
        /// Payload bytes present.
        len: usize,
        /// Payload bytes required.
        expected: usize,
    },
    /// A devmem cmsg of the other kernel family.
    #[error(
        "got a {found} devmem cmsg (type {ty}) while parsing as {expected}; \
         select KernelAbi::{found:?} for this kernel"
    )]
    AbiMismatch {
        /// ABI the parser was told to use.
        expected: KernelAbi,
        /// ABI the cmsg type belongs to.
        found: KernelAbi,
        /// cmsg type seen.
        ty: i32,
    },
    /// A cmsg no devmem ABI defines.
    #[error(
        "unexpected cmsg level {level} type {ty} on a devmem socket; disable \
         the socket option that produces it (timestamps, TCP_INQ, ...)"
    )]
    UnknownCmsg {
        /// `cmsg_level`.
        level: i32,
        /// `cmsg_type`.
        ty: i32,
    },
    /// The fragment sizes do not add up to what recvmsg returned.
    #[error(
        "devmem fragments add up to {fragments} bytes but recvmsg returned \
         {returned}; the stream is out of sync, close the connection"
    )]
    Accounting {
        /// Sum of fragment sizes.
        fragments: u64,
        /// recvmsg's return value.
        returned: u64,
    },
    /// The kernel knows neither ABI's `SO_DEVMEM_DONTNEED`.
    #[error(
        "this kernel has no devmem receive: SO_DEVMEM_DONTNEED is unknown in both \
         ABIs (TCPX 97: {tcpx}; upstream 80: {upstream}); devmem needs Google's TCPX \
         kernel or Linux >= 6.12 built with CONFIG_NET_DEVMEM"
    )]
    NoDevmemAbi {
        /// The kernel's answer to option 97.
        tcpx: crate::error::OsError,
        /// Its answer to option 80.
        upstream: crate::error::OsError,
    },
    /// An upstream fragment of a binding other than the socket's.
    #[error(
        "a devmem fragment of dmabuf {found} arrived on a socket whose pool is \
         dmabuf {expected}; its flow is steered to a queue of another binding"
    )]
    ForeignDmabuf {
        /// The socket's binding id.
        expected: u32,
        /// The fragment's.
        found: u32,
    },
    /// A fragment cannot be expressed in the target ABI.
    #[error("{abi} cannot encode this fragment: {reason}")]
    NotRepresentable {
        /// Target ABI.
        abi: KernelAbi,
        /// What does not fit.
        reason: &'static str,
    },
    /// Token-range bytes whose length is not a multiple of 8.
    #[error(
        "token range bytes are {len} long, not a multiple of 8 ({{u32 start; u32 count}} pairs)"
    )]
    BadTokenBytes {
        /// Length given.
        len: usize,
    },
    /// `setsockopt(SO_DEVMEM_DONTNEED)` failed.
    #[error(
        "setsockopt(SOL_SOCKET, SO_DEVMEM_DONTNEED={optname}) failed for the \
         {abi} ABI: {source}; ENOPROTOOPT means this kernel lacks that ABI \
         (TCPX kernels use 97, upstream >= 6.12 uses 80), EBADF that the socket is not TCP"
    )]
    DontNeed {
        /// ABI used.
        abi: KernelAbi,
        /// Option number passed.
        optname: i32,
        /// The OS error.
        #[source]
        source: crate::error::OsError,
    },
}
