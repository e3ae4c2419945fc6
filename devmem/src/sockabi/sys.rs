//! The one recvmsg call of the devmem RX path.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::KernelAbi;

/// What one [`recv_devmem`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvOutcome {
    /// recvmsg's byte count (0 at EOF).
    pub bytes: usize,
    /// Control bytes the kernel wrote: parse `&control[..control_len]`.
    pub control_len: usize,
    /// `msg_flags` after the call (check `MSG_CTRUNC` via the parser).
    pub msg_flags: i32,
}

/// `recvmsg(fd, { iov = linear, control }, MSG_SOCK_DEVMEM | flags)`.
///
/// Bytes the kernel copies (headers, or a flow not steered to the devmem
/// queue) land in `linear`; feed the result to [`super::parse_rx`].
pub fn recv_devmem(
    fd: BorrowedFd<'_>,
    abi: KernelAbi,
    linear: &mut [u8],
    control: &mut [u8],
    flags: i32,
) -> io::Result<RecvOutcome> {
    let mut iov = libc::iovec {
        iov_base: linear.as_mut_ptr().cast(),
        iov_len: linear.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null name, no iov, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: `msg` points at `iov` and `control`, which point into `linear`
    // and `control`; all are live, exclusively borrowed and sized as stated.
    let ret = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, abi.msg_sock_devmem() | flags) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(RecvOutcome {
        bytes: ret as usize,
        control_len: msg.msg_controllen.min(control.len()),
        msg_flags: msg.msg_flags,
    })
}
