//! The syscall-level seam of a devmem socket.
//!
//! [`DevmemSocket`] is the four calls the devmem data path makes on a
//! socket, with the kernel's argument and result shapes: receive with
//! `MSG_SOCK_DEVMEM` into a linear buffer plus a control buffer, token
//! return (`SO_DEVMEM_DONTNEED` bytes), devmem send with its cmsg, and the
//! error queue's zero-copy completions. Two implementations: the kernel
//! ([`super::sys::KernelSocket`]) and the emulated devmem NIC
//! (`crate::emu::EmuDevmemSocket`), which writes byte-identical control
//! buffers. Everything above (cmsg parsing, unpack planning, token batching,
//! completion tracking, error mapping) is one code path for both.
#![forbid(unsafe_code)]

use std::io;

use super::{KernelAbi, RecvOutcome};
use crate::pool::RxPool;

/// One iovec of a devmem send: `len` bytes named by `base`.
///
/// Upstream kernels read `base` as the offset in the DMA-BUF the TX binding
/// names (`ncdevmem.c`); TCPX kernels take the offset from the cmsg and an
/// iov over a host buffer of `len` bytes (the original's pipe buffer), so
/// there `base` is that buffer's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxIov {
    /// DMA-BUF offset (upstream) or host buffer address (TCPX).
    pub base: u64,
    /// Bytes.
    pub len: usize,
}

/// The devmem calls of one connected TCP socket; see the module docs.
///
/// Errors are the kernel's: an `io::Error` with its errno (`WouldBlock` for
/// `EAGAIN`), so a caller maps them the same way for both implementations.
pub trait DevmemSocket: Send {
    /// The ABI whose control bytes this socket reads and writes.
    fn abi(&self) -> KernelAbi;

    /// `recvmsg(fd, {iov = [linear], control}, MSG_SOCK_DEVMEM | MSG_DONTWAIT)`.
    ///
    /// At most `linear.len()` bytes are received, pool fragments and linear
    /// bytes together; linear bytes are packed from `linear[0]` in stream
    /// order. `bytes == 0` is end of stream; parse the control bytes with
    /// [`super::parse_rx_into`].
    fn recv_devmem(&mut self, linear: &mut [u8], control: &mut [u8]) -> io::Result<RecvOutcome>;

    /// `setsockopt(fd, SOL_SOCKET, SO_DEVMEM_DONTNEED, optval)`: the
    /// syscall's return value (upstream: tokens freed; TCPX: 0).
    fn dontneed(&mut self, optval: &[u8]) -> io::Result<u32>;

    /// `sendmsg(fd, {iov, control}, MSG_ZEROCOPY | MSG_DONTWAIT | MSG_NOSIGNAL)`
    /// with `control` from [`super::encode_tx`]: bytes sent. Each call that
    /// sends bytes takes the next zero-copy id.
    fn send_devmem(&mut self, iov: &[TxIov], control: &[u8]) -> io::Result<usize>;

    /// `recvmsg(fd, {control}, MSG_ERRQUEUE | MSG_DONTWAIT)`: one record's
    /// control bytes (parse with [`super::parse_errqueue`]); `WouldBlock`
    /// when the queue is empty.
    fn recv_errqueue(&mut self, control: &mut [u8]) -> io::Result<RecvOutcome>;

    /// The memory pool fragments' offsets point into: gpumemd's pool, the
    /// DMA-BUF bound with `bind-rx`, or the emulated NIC's pool. Not a
    /// syscall: what the NIC writes, which the unpack reads.
    fn rx_memory(&self) -> Option<&RxPool>;
}
