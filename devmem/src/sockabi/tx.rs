//! TX: the cmsg that makes `sendmsg(MSG_ZEROCOPY)` send from device memory.
//!
//! TCPX (`src/sock/tcpx.h`, gpudirectTCPXPostSend): `SOL_SOCKET` /
//! `SCM_DEVMEM_OFFSET` (99) with `int v[2] = { dmabuf_fd, offset }`.
//! Upstream (`net/core/sock.c` `__sock_cmsg_send`, `ncdevmem.c` do_client):
//! `SOL_SOCKET` / `SCM_DEVMEM_DMABUF` (79) with the `u32` TX binding id, and
//! `cmsg_len` must be exactly `CMSG_LEN(4)`; the dmabuf offset travels as the
//! iov_base.
#![forbid(unsafe_code)]

use std::os::fd::RawFd;

use super::abi::{KernelAbi, SOL_SOCKET};
use super::cmsg::{array, cmsg_len, cmsg_space, RawCmsgs, CMSG_HDR_LEN};
use super::AbiError;

/// Where a devmem send takes its bytes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxTarget {
    /// TCPX: a DMA-BUF fd and a byte offset in it (a C `int`).
    Tcpx {
        /// The exported GPU buffer's fd.
        dmabuf_fd: RawFd,
        /// Offset of the first byte to send.
        offset: i32,
    },
    /// Upstream: the id netlink `bind-tx` returned; the offset is the iov_base.
    Upstream {
        /// TX binding id.
        binding_id: u32,
    },
}

impl TxTarget {
    /// The ABI this target belongs to.
    pub const fn abi(&self) -> KernelAbi {
        match self {
            TxTarget::Tcpx { .. } => KernelAbi::Tcpx,
            TxTarget::Upstream { .. } => KernelAbi::Upstream,
        }
    }
}

const TX_SPACE: usize = cmsg_space(8);

/// A ready TX control buffer, 8-byte aligned like a `cmsghdr`.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxCmsg {
    buf: [u8; TX_SPACE],
    len: usize,
}

impl TxCmsg {
    /// The bytes to point `msg_control` at; `msg_controllen` is their length.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Builds the TX cmsg for `target`.
pub fn encode_tx(target: TxTarget) -> TxCmsg {
    let mut buf = [0u8; TX_SPACE];
    let abi = target.abi();
    let payload_len = abi.tx_payload_len();
    buf[0..8].copy_from_slice(&(cmsg_len(payload_len) as u64).to_ne_bytes());
    buf[8..12].copy_from_slice(&SOL_SOCKET.to_ne_bytes());
    buf[12..16].copy_from_slice(&abi.scm_tx().to_ne_bytes());
    match target {
        TxTarget::Tcpx { dmabuf_fd, offset } => {
            buf[16..20].copy_from_slice(&dmabuf_fd.to_ne_bytes());
            buf[20..24].copy_from_slice(&offset.to_ne_bytes());
        }
        TxTarget::Upstream { binding_id } => {
            buf[16..20].copy_from_slice(&binding_id.to_ne_bytes());
        }
    }
    TxCmsg {
        buf,
        len: cmsg_space(payload_len),
    }
}

/// Reads the TX cmsg a sender passed (for the emulated devmem socket).
///
/// Checks what the kernel checks: exactly one devmem TX cmsg, and for
/// upstream `cmsg_len == CMSG_LEN(4)`.
pub fn decode_tx(abi: KernelAbi, control: &[u8]) -> Result<TxTarget, AbiError> {
    let mut found = None;
    for c in RawCmsgs::new(control) {
        let c = c?;
        if c.level != SOL_SOCKET || c.ty != abi.scm_tx() {
            return Err(AbiError::UnknownCmsg {
                level: c.level,
                ty: c.ty,
            });
        }
        let expected = abi.tx_payload_len();
        if c.data.len() != expected {
            return Err(AbiError::ShortPayload {
                abi,
                ty: c.ty,
                offset: c.offset,
                len: c.data.len(),
                expected,
            });
        }
        if found.is_some() {
            return Err(AbiError::Malformed {
                offset: c.offset,
                reason: "more than one devmem TX cmsg",
            });
        }
        let d = c.data;
        found = Some(match abi {
            KernelAbi::Tcpx => TxTarget::Tcpx {
                dmabuf_fd: i32::from_ne_bytes(array(&d[0..4])),
                offset: i32::from_ne_bytes(array(&d[4..8])),
            },
            KernelAbi::Upstream => TxTarget::Upstream {
                binding_id: u32::from_ne_bytes(array(&d[0..4])),
            },
        });
    }
    found.ok_or(AbiError::Malformed {
        offset: 0,
        reason: "no devmem TX cmsg",
    })
}

const _: () = assert!(TX_SPACE == CMSG_HDR_LEN + 8);

#[cfg(test)]
mod tests {
    use super::*;

    // tcpx.h: cmsg_len = CMSG_LEN(2 * sizeof(int)), buffer CMSG_SPACE(2 * sizeof(int)).
    #[test]
    fn tcpx_tx_bytes() {
        let c = encode_tx(TxTarget::Tcpx {
            dmabuf_fd: 7,
            offset: 4096,
        });
        let b = c.as_bytes();
        assert_eq!(b.len(), 24);
        assert_eq!(&b[0..8], &24u64.to_le_bytes());
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 99, 0, 0, 0]);
        assert_eq!(&b[16..24], &[7, 0, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(b.as_ptr() as usize % 8, 0);
    }

    // ncdevmem.c: cmsg_len = CMSG_LEN(sizeof(__u32)); buffer CMSG_SPACE(4).
    #[test]
    fn upstream_tx_bytes() {
        let c = encode_tx(TxTarget::Upstream {
            binding_id: 0x0102_0304,
        });
        let b = c.as_bytes();
        assert_eq!(b.len(), 24);
        assert_eq!(&b[0..8], &20u64.to_le_bytes());
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 79, 0, 0, 0]);
        assert_eq!(&b[16..24], &[4, 3, 2, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn tx_round_trips_and_checks() {
        for t in [
            TxTarget::Tcpx {
                dmabuf_fd: -1,
                offset: i32::MAX,
            },
            TxTarget::Upstream { binding_id: 9 },
        ] {
            let c = encode_tx(t);
            assert_eq!(decode_tx(t.abi(), c.as_bytes()).unwrap(), t);
        }
        let up = encode_tx(TxTarget::Upstream { binding_id: 9 });
        assert!(matches!(
            decode_tx(KernelAbi::Tcpx, up.as_bytes()),
            Err(AbiError::UnknownCmsg { ty: 79, .. })
        ));
        assert!(decode_tx(KernelAbi::Upstream, &[]).is_err());
        let mut two = up.as_bytes().to_vec();
        two.extend_from_slice(up.as_bytes());
        assert!(decode_tx(KernelAbi::Upstream, &two).is_err());
    }
}
