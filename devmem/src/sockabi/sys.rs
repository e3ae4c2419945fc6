//! The kernel side of the seam: the devmem syscalls on a real socket.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::socket::{DevmemSocket, TxIov};
use super::tokens::TOKEN_RANGE_LEN;
use super::KernelAbi;
use crate::pool::RxPool;

/// What one receive (devmem or error queue) returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvOutcome {
    /// recvmsg's byte count (0 at EOF).
    pub bytes: usize,
    /// Control bytes the kernel wrote: parse `&control[..control_len]`.
    pub control_len: usize,
    /// `msg_flags` after the call (check `MSG_CTRUNC` via the parser).
    pub msg_flags: i32,
}

/// `MSG_ZEROCOPY` (`include/linux/socket.h`).
pub const MSG_ZEROCOPY: i32 = 0x0400_0000;

/// A connected TCP socket's devmem calls, answered by the running kernel.
#[derive(Debug)]
pub struct KernelSocket {
    fd: OwnedFd,
    abi: KernelAbi,
    memory: Option<Arc<RxPool>>,
}

impl KernelSocket {
    /// The devmem calls of `fd` (a duplicate of the data socket is fine) in
    /// `abi`, receiving into `memory` (the pool bound to its RX queue; `None`
    /// on a sending socket).
    pub fn new(fd: OwnedFd, abi: KernelAbi, memory: Option<Arc<RxPool>>) -> Self {
        KernelSocket { fd, abi, memory }
    }

    fn recvmsg(
        &self,
        iov: Option<&mut [u8]>,
        control: &mut [u8],
        flags: i32,
    ) -> io::Result<RecvOutcome> {
        let mut one = iov.map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        });
        // SAFETY: an all-zero msghdr is valid (null name, no iov, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        if let Some(v) = one.as_mut() {
            msg.msg_iov = v;
            msg.msg_iovlen = 1;
        }
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: `msg` points at `one` and `control`, which point into
        // buffers exclusively borrowed for this call and sized as stated.
        let ret = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RecvOutcome {
            bytes: ret as usize,
            control_len: msg.msg_controllen.min(control.len()),
            msg_flags: msg.msg_flags,
        })
    }
}

impl DevmemSocket for KernelSocket {
    fn abi(&self) -> KernelAbi {
        self.abi
    }

    fn recv_devmem(&mut self, linear: &mut [u8], control: &mut [u8]) -> io::Result<RecvOutcome> {
        let flags = self.abi.msg_sock_devmem() | libc::MSG_DONTWAIT;
        self.recvmsg(Some(linear), control, flags)
    }

    fn dontneed(&mut self, optval: &[u8]) -> io::Result<u32> {
        let len = libc::socklen_t::try_from(optval.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        debug_assert_eq!(optval.len() % TOKEN_RANGE_LEN, 0);
        // SAFETY: `optval` is a live byte slice of `len` bytes; the kernel
        // only reads it.
        let ret = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                self.abi.so_devmem_dontneed(),
                optval.as_ptr().cast(),
                len,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as u32)
    }

    fn send_devmem(&mut self, iov: &[TxIov], control: &[u8]) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = iov
            .iter()
            .map(|v| libc::iovec {
                // Upstream: a DMA-BUF offset, never dereferenced by us; TCPX:
                // a host buffer the caller keeps alive for the call.
                iov_base: v.base as usize as *mut libc::c_void,
                iov_len: v.len,
            })
            .collect();
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = iovs.len();
        // sendmsg only reads the control buffer.
        msg.msg_control = control.as_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.len();
        let flags = MSG_ZEROCOPY | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        // SAFETY: `msg` points at `iovs` and `control`, live for the call;
        // the kernel reads the iov bases as DMA-BUF offsets (upstream,
        // checked against the binding) or a caller-owned host buffer (TCPX).
        let ret = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, flags) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }

    fn recv_errqueue(&mut self, control: &mut [u8]) -> io::Result<RecvOutcome> {
        self.recvmsg(None, control, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
    }

    fn rx_memory(&self) -> Option<&RxPool> {
        self.memory.as_deref()
    }
}

/// `struct dma_buf_create_pages_info` of Google's TCPX kernels
/// (google/nccl-plugin-gpudirecttcpx `src/gpu/tx_pool.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaBufCreatePagesInfo {
    /// The NIC's PCI bus, device and function.
    pub pci_bdf: [u64; 3],
    /// The DMA-BUF to make TX pages of.
    pub dma_buf_fd: i32,
    /// 0, as the plugin passes.
    pub create_page_pool: i32,
}

/// `DMA_BUF_CREATE_PAGES = _IOW('b', 2, struct dma_buf_create_pages_info)`.
pub const DMA_BUF_CREATE_PAGES: u64 = (1 << 30)
    | ((std::mem::size_of::<DmaBufCreatePagesInfo>() as u64) << 16)
    | ((b'b' as u64) << 8)
    | 2;

/// The NIC's bus, device and function from its PCI address, read as the
/// plugin reads it (`sscanf("0000:%hx:%hx.%hx")`: domain 0 only).
pub fn parse_nic_bdf(pci: &str) -> Option<[u64; 3]> {
    let rest = pci.strip_prefix("0000:")?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let h = |s: &str| u16::from_str_radix(s, 16).ok().map(u64::from);
    Some([h(bus)?, h(dev)?, h(func)?])
}

/// TCPX kernels: the fd that devmem sends from `dmabuf` on the NIC at
/// `nic_pci` name in their cmsg (`ioctl(dmabuf, DMA_BUF_CREATE_PAGES)`,
/// which returns it). Other kernels answer `ENOTTY`.
pub fn tcpx_tx_pages(dmabuf: std::os::fd::BorrowedFd<'_>, nic_pci: &str) -> io::Result<OwnedFd> {
    let pci_bdf = parse_nic_bdf(nic_pci).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NIC PCI address {nic_pci:?} is not 0000:bus:dev.fn"),
        )
    })?;
    let mut info = DmaBufCreatePagesInfo {
        pci_bdf,
        dma_buf_fd: dmabuf.as_raw_fd(),
        create_page_pool: 0,
    };
    // SAFETY: an ioctl on a live fd with a pointer to a live struct of the
    // size the request number encodes.
    let ret = unsafe {
        libc::ioctl(
            dmabuf.as_raw_fd(),
            DMA_BUF_CREATE_PAGES as libc::Ioctl,
            &mut info as *mut DmaBufCreatePagesInfo,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh fd that nothing else owns.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(ret) })
}

/// Whether the running kernel knows `abi`'s `SO_DEVMEM_DONTNEED` option:
/// one empty token range on a fresh TCP socket. `Err` carries the kernel's
/// answer (`ENOPROTOOPT`: the kernel lacks that ABI).
pub fn probe_abi(abi: KernelAbi) -> io::Result<()> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let empty = [0u8; TOKEN_RANGE_LEN];
    // SAFETY: a live socket and 8 readable bytes; the kernel only reads them.
    let ret = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            abi.so_devmem_dontneed(),
            empty.as_ptr().cast(),
            TOKEN_RANGE_LEN as libc::socklen_t,
        )
    };
    match ret {
        0.. => Ok(()),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Err(e),
            // Known option, other complaint (a TCPX kernel may refuse an empty range).
            _ => Ok(()),
        },
    }
}

/// The devmem ABI the running kernel speaks: TCPX where it knows option
/// 97, else upstream where it knows 80.
pub fn kernel_abi() -> Result<KernelAbi, super::AbiError> {
    let tcpx = match probe_abi(KernelAbi::Tcpx) {
        Ok(()) => return Ok(KernelAbi::Tcpx),
        Err(e) => e,
    };
    match probe_abi(KernelAbi::Upstream) {
        Ok(()) => Ok(KernelAbi::Upstream),
        Err(upstream) => Err(super::AbiError::NoDevmemAbi {
            tcpx: tcpx.into(),
            upstream: upstream.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_zerocopy_matches_libc() {
        assert_eq!(MSG_ZEROCOPY, libc::MSG_ZEROCOPY);
    }

    // tx_pool.cu: DMA_BUF_CREATE_PAGES = _IOW('b', 2, ...) = 0x40206202.
    #[test]
    fn tcpx_create_pages_request_and_bdf() {
        assert_eq!(std::mem::size_of::<DmaBufCreatePagesInfo>(), 32);
        assert_eq!(DMA_BUF_CREATE_PAGES, 0x4020_6202);
        assert_eq!(parse_nic_bdf("0000:06:00.0"), Some([6, 0, 0]));
        assert_eq!(parse_nic_bdf("0000:c4:1f.7"), Some([0xc4, 0x1f, 7]));
        assert_eq!(
            parse_nic_bdf("0001:06:00.0"),
            None,
            "the plugin reads domain 0 only"
        );
        assert_eq!(parse_nic_bdf("06:00.0"), None);
        // Not a DMA-BUF of a TCPX kernel: the kernel's answer, typed.
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = tcpx_tx_pages(std::os::fd::AsFd::as_fd(&f), "0000:06:00.0").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    }
}
