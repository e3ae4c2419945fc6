//! The two devmem kernel ABIs and every constant they use.
//!
//! Sources (each value is pinned by a test below):
//! - TCPX: `google/nccl-plugin-gpudirecttcpx@4b8ea7f2:src/sock/tcpx.h`
//!   (option/cmsg numbers, `struct devmemvec`, the TX cmsg) and
//!   `src/devcomm/unpack_defs1.h` (`MSG_SOCK_DEVMEM`, `struct devmemtoken`).
//! - Upstream: `torvalds/linux:include/uapi/asm-generic/socket.h` (78/79/80,
//!   added for 6.12), `include/uapi/linux/uio.h` (`struct dmabuf_cmsg`,
//!   `struct dmabuf_token`), `include/linux/socket.h` (`MSG_SOCK_DEVMEM`),
//!   `net/core/sock.c` (`MAX_DONTNEED_TOKENS`, `MAX_DONTNEED_FRAGS`,
//!   `SCM_DEVMEM_DMABUF` TX check), and
//!   `tools/testing/selftests/drivers/net/hw/ncdevmem.c`.
#![forbid(unsafe_code)]

/// `SOL_SOCKET` on x86-64 (`include/uapi/asm-generic/socket.h`).
pub const SOL_SOCKET: i32 = 1;
/// `MSG_CTRUNC`: the control buffer was too small (`include/linux/socket.h`).
pub const MSG_CTRUNC: i32 = 0x8;

/// Constants of Google's TCPX kernels, as the original plugin uses them.
pub mod tcpx {
    /// `SO_DEVMEM_DONTNEED` (`src/sock/tcpx.h`).
    pub const SO_DEVMEM_DONTNEED: i32 = 97;
    /// `SO_DEVMEM_HEADER` (`src/sock/tcpx.h`).
    pub const SO_DEVMEM_HEADER: i32 = 98;
    /// `SCM_DEVMEM_HEADER` = `SO_DEVMEM_HEADER`: bytes that landed in the linear (iov) buffer.
    pub const SCM_DEVMEM_HEADER: i32 = SO_DEVMEM_HEADER;
    /// `SO_DEVMEM_OFFSET` (`src/sock/tcpx.h`).
    pub const SO_DEVMEM_OFFSET: i32 = 99;
    /// `SCM_DEVMEM_OFFSET` = `SO_DEVMEM_OFFSET`: an RX pool fragment, and the TX cmsg.
    pub const SCM_DEVMEM_OFFSET: i32 = SO_DEVMEM_OFFSET;
    /// `MSG_SOCK_DEVMEM` (`src/devcomm/unpack_defs1.h`); same value as upstream.
    pub const MSG_SOCK_DEVMEM: i32 = 0x0200_0000;
    /// Size of `struct devmemvec { u32 frag_offset; u32 frag_size; u32 frag_token; }`.
    pub const DEVMEMVEC_LEN: usize = 12;
    /// Size of the TX payload `int v[2] = { dmabuf_fd, offset }`.
    pub const TX_PAYLOAD_LEN: usize = 8;
    /// The original's cap on fragments per unpack slice:
    /// `TCPX_UNPACK_MAX_SLICE_PAGES` -> `NET_UNPACK_MAX_SLICE_PAGES` =
    /// 4 MiB / 4096 * 2 (`NVIDIA/nccl:src/device/network/unpack/unpack_defs.h`).
    /// The original exits the process at this count; we batch instead.
    pub const UNPACK_MAX_SLICE_PAGES: usize = 2048;
}

/// Constants of upstream Linux devmem TCP (RX >= 6.12, TX >= 6.15).
pub mod upstream {
    /// `SO_DEVMEM_LINEAR` / `SCM_DEVMEM_LINEAR` (x86-64 value; parisc/sparc differ).
    pub const SO_DEVMEM_LINEAR: i32 = 78;
    /// `SCM_DEVMEM_LINEAR` = `SO_DEVMEM_LINEAR`.
    pub const SCM_DEVMEM_LINEAR: i32 = SO_DEVMEM_LINEAR;
    /// `SO_DEVMEM_DMABUF`.
    pub const SO_DEVMEM_DMABUF: i32 = 79;
    /// `SCM_DEVMEM_DMABUF` = `SO_DEVMEM_DMABUF`: an RX dmabuf fragment, and the TX cmsg.
    pub const SCM_DEVMEM_DMABUF: i32 = SO_DEVMEM_DMABUF;
    /// `SO_DEVMEM_DONTNEED`.
    pub const SO_DEVMEM_DONTNEED: i32 = 80;
    /// `MSG_SOCK_DEVMEM` (`include/linux/socket.h`, `ncdevmem.c`).
    pub const MSG_SOCK_DEVMEM: i32 = 0x0200_0000;
    /// Size of `struct dmabuf_cmsg { u64 frag_offset; u32 frag_size; u32 frag_token; u32 dmabuf_id; u32 flags; }`.
    pub const DMABUF_CMSG_LEN: usize = 24;
    /// Size of the TX payload: the `u32` TX binding id (`__sock_cmsg_send`
    /// requires `cmsg_len == CMSG_LEN(sizeof(u32))`).
    pub const TX_PAYLOAD_LEN: usize = 4;
    /// `MAX_DONTNEED_TOKENS`: ranges per `SO_DEVMEM_DONTNEED` call (more is `EINVAL`).
    pub const MAX_DONTNEED_TOKENS: usize = 128;
    /// `MAX_DONTNEED_FRAGS`: tokens freed per call; the kernel silently stops after this many.
    pub const MAX_DONTNEED_FRAGS: usize = 1024;
}

/// Which devmem socket ABI the running kernel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelAbi {
    /// Google's TCPX kernels (COS on A3 High): options 97/98/99, 12-byte fragment cmsgs.
    Tcpx,
    /// Upstream Linux >= 6.12: options 78/79/80, `struct dmabuf_cmsg`.
    Upstream,
}

impl KernelAbi {
    /// Both ABIs, for tests and probing.
    pub const ALL: [KernelAbi; 2] = [KernelAbi::Tcpx, KernelAbi::Upstream];

    /// The `setsockopt(SOL_SOCKET, ...)` option that gives tokens back.
    pub const fn so_devmem_dontneed(self) -> i32 {
        match self {
            KernelAbi::Tcpx => tcpx::SO_DEVMEM_DONTNEED,
            KernelAbi::Upstream => upstream::SO_DEVMEM_DONTNEED,
        }
    }

    /// cmsg type of bytes copied into the linear (iov) buffer.
    pub const fn scm_linear(self) -> i32 {
        match self {
            KernelAbi::Tcpx => tcpx::SCM_DEVMEM_HEADER,
            KernelAbi::Upstream => upstream::SCM_DEVMEM_LINEAR,
        }
    }

    /// cmsg type of a fragment that landed in the device-memory pool.
    pub const fn scm_pool(self) -> i32 {
        match self {
            KernelAbi::Tcpx => tcpx::SCM_DEVMEM_OFFSET,
            KernelAbi::Upstream => upstream::SCM_DEVMEM_DMABUF,
        }
    }

    /// cmsg type of the devmem TX cmsg given to `sendmsg(MSG_ZEROCOPY)`.
    pub const fn scm_tx(self) -> i32 {
        match self {
            KernelAbi::Tcpx => tcpx::SCM_DEVMEM_OFFSET,
            KernelAbi::Upstream => upstream::SCM_DEVMEM_DMABUF,
        }
    }

    /// The `recvmsg` flag asking for devmem fragments (0x2000000 in both).
    pub const fn msg_sock_devmem(self) -> i32 {
        match self {
            KernelAbi::Tcpx => tcpx::MSG_SOCK_DEVMEM,
            KernelAbi::Upstream => upstream::MSG_SOCK_DEVMEM,
        }
    }

    /// Payload size of one RX fragment cmsg.
    pub const fn rx_payload_len(self) -> usize {
        match self {
            KernelAbi::Tcpx => tcpx::DEVMEMVEC_LEN,
            KernelAbi::Upstream => upstream::DMABUF_CMSG_LEN,
        }
    }

    /// Payload size of the TX cmsg.
    pub const fn tx_payload_len(self) -> usize {
        match self {
            KernelAbi::Tcpx => tcpx::TX_PAYLOAD_LEN,
            KernelAbi::Upstream => upstream::TX_PAYLOAD_LEN,
        }
    }

    /// Most token ranges one `SO_DEVMEM_DONTNEED` call may carry.
    ///
    /// The TCPX kernel's limit is not public; the upstream limits are the
    /// conservative choice for both (the original sent up to 2048 ranges).
    pub const fn max_dontneed_ranges(self) -> usize {
        upstream::MAX_DONTNEED_TOKENS
    }

    /// Most tokens one `SO_DEVMEM_DONTNEED` call may free.
    pub const fn max_dontneed_tokens(self) -> usize {
        upstream::MAX_DONTNEED_FRAGS
    }

    /// Whether the kernel's `SO_DEVMEM_DONTNEED` return value is the count freed.
    /// Upstream returns it; TCPX kernels return 0 on success.
    pub const fn dontneed_reports_count(self) -> bool {
        matches!(self, KernelAbi::Upstream)
    }

    /// The ABI whose RX cmsg types include `ty` (at `SOL_SOCKET`), if any.
    pub const fn from_rx_cmsg_type(ty: i32) -> Option<KernelAbi> {
        match ty {
            tcpx::SCM_DEVMEM_HEADER | tcpx::SCM_DEVMEM_OFFSET => Some(KernelAbi::Tcpx),
            upstream::SCM_DEVMEM_LINEAR | upstream::SCM_DEVMEM_DMABUF => Some(KernelAbi::Upstream),
            _ => None,
        }
    }

    /// Short name for messages.
    pub const fn name(self) -> &'static str {
        match self {
            KernelAbi::Tcpx => "TCPX",
            KernelAbi::Upstream => "upstream",
        }
    }
}

impl std::fmt::Display for KernelAbi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // google/nccl-plugin-gpudirecttcpx@4b8ea7f2:src/sock/tcpx.h
    #[test]
    fn tcpx_values_match_plugin_tcpx_h() {
        assert_eq!(tcpx::SO_DEVMEM_DONTNEED, 97);
        assert_eq!(tcpx::SO_DEVMEM_HEADER, 98);
        assert_eq!(tcpx::SCM_DEVMEM_HEADER, 98);
        assert_eq!(tcpx::SO_DEVMEM_OFFSET, 99);
        assert_eq!(tcpx::SCM_DEVMEM_OFFSET, 99);
        // struct devmemvec is three __u32; TX payload is int v[2].
        assert_eq!(tcpx::DEVMEMVEC_LEN, 3 * 4);
        assert_eq!(tcpx::TX_PAYLOAD_LEN, 2 * std::mem::size_of::<libc::c_int>());
    }

    // plugin src/devcomm/unpack_defs1.h: #define MSG_SOCK_DEVMEM 0x2000000;
    // NVIDIA/nccl src/device/network/unpack/unpack_defs.h:
    // NET_UNPACK_MAX_SLICE_PAGES = (4194304 / 4096 * 2).
    #[test]
    fn tcpx_flag_and_slice_cap_match_sources() {
        assert_eq!(tcpx::MSG_SOCK_DEVMEM, 0x2000000);
        assert_eq!(tcpx::UNPACK_MAX_SLICE_PAGES, 4_194_304 / 4096 * 2);
    }

    // torvalds/linux include/uapi/asm-generic/socket.h, include/linux/socket.h,
    // include/uapi/linux/uio.h, net/core/sock.c.
    #[test]
    fn upstream_values_match_kernel_uapi() {
        assert_eq!(upstream::SO_DEVMEM_LINEAR, 78);
        assert_eq!(upstream::SCM_DEVMEM_LINEAR, 78);
        assert_eq!(upstream::SO_DEVMEM_DMABUF, 79);
        assert_eq!(upstream::SCM_DEVMEM_DMABUF, 79);
        assert_eq!(upstream::SO_DEVMEM_DONTNEED, 80);
        assert_eq!(upstream::MSG_SOCK_DEVMEM, 0x2000000);
        assert_eq!(upstream::DMABUF_CMSG_LEN, 8 + 4 * 4);
        assert_eq!(upstream::TX_PAYLOAD_LEN, 4);
        assert_eq!(upstream::MAX_DONTNEED_TOKENS, 128);
        assert_eq!(upstream::MAX_DONTNEED_FRAGS, 1024);
    }

    // The libc crate (>= 0.2.180) carries the upstream values and structs.
    #[test]
    fn upstream_values_match_libc_crate() {
        assert_eq!(upstream::SO_DEVMEM_LINEAR, libc::SO_DEVMEM_LINEAR);
        assert_eq!(upstream::SCM_DEVMEM_LINEAR, libc::SCM_DEVMEM_LINEAR);
        assert_eq!(upstream::SO_DEVMEM_DMABUF, libc::SO_DEVMEM_DMABUF);
        assert_eq!(upstream::SCM_DEVMEM_DMABUF, libc::SCM_DEVMEM_DMABUF);
        assert_eq!(upstream::SO_DEVMEM_DONTNEED, libc::SO_DEVMEM_DONTNEED);
        assert_eq!(
            upstream::DMABUF_CMSG_LEN,
            std::mem::size_of::<libc::dmabuf_cmsg>()
        );
        assert_eq!(8, std::mem::size_of::<libc::dmabuf_token>());
        assert_eq!(SOL_SOCKET, libc::SOL_SOCKET);
        assert_eq!(MSG_CTRUNC, libc::MSG_CTRUNC);
    }

    #[test]
    fn abi_accessors_pick_their_family() {
        assert_eq!(KernelAbi::Tcpx.so_devmem_dontneed(), 97);
        assert_eq!(KernelAbi::Upstream.so_devmem_dontneed(), 80);
        assert_eq!(KernelAbi::Tcpx.scm_linear(), 98);
        assert_eq!(KernelAbi::Upstream.scm_linear(), 78);
        assert_eq!(KernelAbi::Tcpx.scm_pool(), 99);
        assert_eq!(KernelAbi::Upstream.scm_pool(), 79);
        assert_eq!(KernelAbi::Tcpx.scm_tx(), 99);
        assert_eq!(KernelAbi::Upstream.scm_tx(), 79);
        for abi in KernelAbi::ALL {
            assert_eq!(abi.msg_sock_devmem(), 0x2000000);
            assert_eq!(KernelAbi::from_rx_cmsg_type(abi.scm_linear()), Some(abi));
            assert_eq!(KernelAbi::from_rx_cmsg_type(abi.scm_pool()), Some(abi));
        }
        assert_eq!(KernelAbi::from_rx_cmsg_type(libc::SCM_RIGHTS), None);
    }
}
