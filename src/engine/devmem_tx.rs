//! The devmem send side of one data socket, over the [`DevmemSocket`] seam
//! (the kernel's socket or the emulated NIC's): a chunk's body leaves by
//! `sendmsg(MSG_ZEROCOPY)` with the devmem TX cmsg that names the region's
//! DMA-BUF, its header before it by a plain send; completions come from the
//! error queue and release the jobs as MSG_ZEROCOPY host sends do (the
//! socket's zero-copy tracker counts both).

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};

use devmem::emu::{EmuConfig, EmuDevmemSocket};
use devmem::pool::{RxPool, PAGE_SIZE};
use devmem::sockabi::{
    encode_tx, parse_errqueue, DevmemSocket, ErrRecord, KernelAbi, KernelSocket, TxIov, TxTarget,
    ZcRange,
};

use crate::error::{Error, Result};
use crate::memory::Region;
use crate::path::TxDevmem;

/// A chunk body that leaves by devmem TX.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DevmemBody {
    target: TxTarget,
    /// The iov base: the DMA-BUF offset (upstream); `None`: a host buffer.
    base: Option<u64>,
    pub len: usize,
}

/// One data socket's devmem sends.
pub(super) struct DevmemTx {
    sock: Box<dyn DevmemSocket>,
    nic: usize,
    abi: KernelAbi,
    /// The TCPX iov: a host buffer as long as the send (the original
    /// passes its pipe buffer; the kernel takes the bytes from the cmsg).
    host: Vec<u8>,
    control: Vec<u8>,
    pub emulated: bool,
}

impl DevmemTx {
    pub fn new(stream: &TcpStream, nic: usize, tx: TxDevmem) -> Result<Self> {
        let dup = stream
            .try_clone()
            .map_err(|e| Error::io("dup data socket", e))?;
        let sock: Box<dyn DevmemSocket> = if tx.emulated {
            let mut cfg = EmuConfig::new(tx.abi).with_seed(stream.as_raw_fd() as u64);
            cfg.ipv6 = stream.local_addr().is_ok_and(|a| a.is_ipv6());
            // A sending socket receives nothing: the smallest pool.
            let pool = RxPool::local(PAGE_SIZE).map_err(Error::devmem)?;
            Box::new(EmuDevmemSocket::new(dup, pool, cfg).map_err(Error::devmem)?)
        } else {
            Box::new(KernelSocket::new(OwnedFd::from(dup), tx.abi, None))
        };
        Ok(DevmemTx {
            sock,
            nic,
            abi: tx.abi,
            host: Vec::new(),
            control: vec![0; 256],
            emulated: tx.emulated,
        })
    }

    /// The devmem send of `len` bytes at `off` of `region`, if this NIC
    /// names the region.
    pub fn body(&self, region: &Region, off: u64, len: usize) -> Option<DevmemBody> {
        let (target, base) = region.devmem_tx(self.nic)?.target(self.abi, off)?;
        Some(DevmemBody { target, base, len })
    }

    /// One `sendmsg(MSG_ZEROCOPY)` with the devmem cmsg: bytes sent.
    pub fn send(&mut self, b: &DevmemBody) -> io::Result<usize> {
        let base = match b.base {
            Some(off) => off,
            None => {
                if self.host.len() < b.len {
                    self.host.resize(b.len, 0);
                }
                self.host.as_ptr() as u64
            }
        };
        let cmsg = encode_tx(b.target);
        self.sock
            .send_devmem(&[TxIov { base, len: b.len }], cmsg.as_bytes())
    }

    /// Every completion in the error queue, appended to `out`.
    pub fn completions(&mut self, out: &mut Vec<ZcRange>) -> Result<()> {
        loop {
            let o = match self.sock.recv_errqueue(&mut self.control) {
                Ok(o) => o,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("devmem TX completions", e)),
            };
            let records = parse_errqueue(&self.control[..o.control_len]).map_err(Error::devmem)?;
            for r in records {
                match r {
                    ErrRecord::Zerocopy(z) => out.push(z),
                    // TCP sockets get no other records unless IP_RECVERR is set.
                    ErrRecord::Other { errno, origin } => {
                        tracing::debug!(errno, origin, "error-queue record skipped")
                    }
                }
            }
        }
    }
}
