//! RX: the fragment descriptors `recvmsg(MSG_SOCK_DEVMEM)` returns, for both ABIs.
//!
//! TCPX payload (`src/sock/tcpx.h`, `struct devmemvec`):
//! `{ u32 frag_offset; u32 frag_size; u32 frag_token; }`, type 98 (header
//! bytes in the iov) or 99 (pool fragment).
//! Upstream payload (`include/uapi/linux/uio.h`, `struct dmabuf_cmsg`):
//! `{ u64 frag_offset; u32 frag_size; u32 frag_token; u32 dmabuf_id; u32 flags; }`,
//! type 78 (linear: only `frag_size` set) or 79 (dmabuf fragment).
#![forbid(unsafe_code)]

use super::abi::{KernelAbi, MSG_CTRUNC, SOL_SOCKET};
use super::cmsg::{array, cmsg_space, push_cmsg, RawCmsg, RawCmsgs};
use super::AbiError;

/// One piece of a devmem receive, in stream order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// `len` bytes the kernel copied into the recvmsg iov (linear buffer).
    Linear {
        /// Bytes in the iov.
        len: u32,
    },
    /// `len` bytes at `offset` in the device-memory pool; give `token` back.
    Pool {
        /// Offset in the pool (TCPX) or dmabuf (upstream).
        offset: u64,
        /// Bytes.
        len: u32,
        /// Token for `SO_DEVMEM_DONTNEED`.
        token: u32,
        /// Upstream: the RX binding's dmabuf id; TCPX: `None`.
        dmabuf_id: Option<u32>,
    },
}

impl Fragment {
    /// Bytes this fragment carries.
    pub const fn len(&self) -> u32 {
        match *self {
            Fragment::Linear { len } | Fragment::Pool { len, .. } => len,
        }
    }

    /// Whether it carries no bytes.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The token to give back, for pool fragments.
    pub const fn token(&self) -> Option<u32> {
        match *self {
            Fragment::Pool { token, .. } => Some(token),
            Fragment::Linear { .. } => None,
        }
    }
}

/// Typed decoding iterator over a devmem control buffer.
///
/// Yields one `Result<Fragment>` per cmsg and stops after the first error.
/// Unknown cmsgs are errors, not skipped: on a devmem socket they mean the
/// wrong ABI or a stray socket option, and skipping would hide the cause of
/// the accounting mismatch that follows.
#[derive(Debug, Clone)]
pub struct Fragments<'a> {
    abi: KernelAbi,
    raw: RawCmsgs<'a>,
    failed: bool,
}

impl<'a> Fragments<'a> {
    /// Decodes `control` (exactly the `msg_controllen` bytes) as `abi`.
    pub fn new(abi: KernelAbi, control: &'a [u8]) -> Self {
        Fragments {
            abi,
            raw: RawCmsgs::new(control),
            failed: false,
        }
    }
}

impl Iterator for Fragments<'_> {
    type Item = Result<Fragment, AbiError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.raw.next()?.and_then(|c| decode(self.abi, &c));
        self.failed = item.is_err();
        Some(item)
    }
}

fn decode(abi: KernelAbi, c: &RawCmsg<'_>) -> Result<Fragment, AbiError> {
    let linear = c.ty == abi.scm_linear();
    if c.level != SOL_SOCKET || !(linear || c.ty == abi.scm_pool()) {
        return Err(match KernelAbi::from_rx_cmsg_type(c.ty) {
            Some(found) if c.level == SOL_SOCKET => AbiError::AbiMismatch {
                expected: abi,
                found,
                ty: c.ty,
            },
            _ => AbiError::UnknownCmsg {
                level: c.level,
                ty: c.ty,
            },
        });
    }
    let expected = abi.rx_payload_len();
    // Longer payloads are tolerated: a future kernel may append fields.
    if c.data.len() < expected {
        return Err(AbiError::ShortPayload {
            abi,
            ty: c.ty,
            offset: c.offset,
            len: c.data.len(),
            expected,
        });
    }
    let d = c.data;
    let u32_at = |at: usize| u32::from_ne_bytes(array(&d[at..at + 4]));
    let (offset, len, token, dmabuf_id) = match abi {
        KernelAbi::Tcpx => (u64::from(u32_at(0)), u32_at(4), u32_at(8), None),
        KernelAbi::Upstream => (
            u64::from_ne_bytes(array(&d[0..8])),
            u32_at(8),
            u32_at(12),
            Some(u32_at(16)),
        ),
    };
    Ok(if linear {
        Fragment::Linear { len }
    } else {
        Fragment::Pool {
            offset,
            len,
            token,
            dmabuf_id,
        }
    })
}

/// Parses one recvmsg's control data into `out` (appended).
///
/// `returned` is recvmsg's byte count and `msg_flags` the `msghdr`'s flags
/// after the call. An empty `control` with bytes returned means the bytes
/// are plain data in the iov (a flow not steered to the devmem queue): they
/// come back as [`Fragment::Linear`]. On error `out` is left as it was; give back the tokens
/// [`salvage_tokens`] finds, then close the connection.
pub fn parse_rx_into(
    abi: KernelAbi,
    control: &[u8],
    returned: usize,
    msg_flags: i32,
    out: &mut Vec<Fragment>,
) -> Result<(), AbiError> {
    if msg_flags & MSG_CTRUNC != 0 {
        return Err(AbiError::ControlTruncated { len: control.len() });
    }
    let start = out.len();
    if control.is_empty() {
        // The kernel copies readable (non-devmem) skbs into the iov with no
        // cmsg at all and never mixes them with devmem ones in one call
        // (net/ipv4/tcp.c tcp_recvmsg_locked, last_copied_dmabuf): all linear.
        // One recvmsg moves at most MAX_RW_COUNT (< 2 GiB), so one fragment.
        let len = u32::try_from(returned).map_err(|_| AbiError::Accounting {
            fragments: 0,
            returned: returned as u64,
        })?;
        if len > 0 {
            out.push(Fragment::Linear { len });
        }
        return Ok(());
    }
    let mut total: u64 = 0;
    for frag in Fragments::new(abi, control) {
        match frag {
            Ok(f) => {
                total += u64::from(f.len());
                out.push(f);
            }
            Err(e) => {
                out.truncate(start);
                return Err(e);
            }
        }
    }
    if total != returned as u64 {
        out.truncate(start);
        return Err(AbiError::Accounting {
            fragments: total,
            returned: returned as u64,
        });
    }
    Ok(())
}

/// Parses one recvmsg's control data; see [`parse_rx_into`].
pub fn parse_rx(
    abi: KernelAbi,
    control: &[u8],
    returned: usize,
    msg_flags: i32,
) -> Result<Vec<Fragment>, AbiError> {
    let mut out = Vec::new();
    parse_rx_into(abi, control, returned, msg_flags, &mut out)?;
    Ok(out)
}

/// Tokens of every well-formed pool fragment, best effort, never failing.
///
/// For the error path: the kernel holds these buffers until they are given
/// back, whatever else went wrong with the receive.
pub fn salvage_tokens(abi: KernelAbi, control: &[u8]) -> Vec<u32> {
    RawCmsgs::new(control)
        .map_while(Result::ok)
        .filter_map(|c| decode(abi, &c).ok())
        .filter_map(|f| f.token())
        .collect()
}

/// Serialises fragments as the kernel writes them (each cmsg padded to
/// `CMSG_SPACE`), appended to `out`. The inverse of [`parse_rx`].
///
/// TCPX has no dmabuf id and 32-bit offsets; upstream needs a dmabuf id on
/// pool fragments. On error `out` is left as it was.
pub fn encode_rx(abi: KernelAbi, frags: &[Fragment], out: &mut Vec<u8>) -> Result<(), AbiError> {
    let start = out.len();
    out.reserve(frags.len() * cmsg_space(abi.rx_payload_len()));
    for f in frags {
        if let Err(e) = encode_one(abi, f, out) {
            out.truncate(start);
            return Err(e);
        }
    }
    Ok(())
}

fn encode_one(abi: KernelAbi, f: &Fragment, out: &mut Vec<u8>) -> Result<(), AbiError> {
    let (ty, offset, len, token, id) = match *f {
        Fragment::Linear { len } => (abi.scm_linear(), 0, len, 0, None),
        Fragment::Pool {
            offset,
            len,
            token,
            dmabuf_id,
        } => (abi.scm_pool(), offset, len, token, dmabuf_id),
    };
    match abi {
        KernelAbi::Tcpx => {
            let offset = u32::try_from(offset).map_err(|_| AbiError::NotRepresentable {
                abi,
                reason: "TCPX fragment offsets are 32-bit",
            })?;
            if id.is_some() {
                return Err(AbiError::NotRepresentable {
                    abi,
                    reason: "TCPX fragments carry no dmabuf id",
                });
            }
            let mut p = [0u8; 12];
            p[0..4].copy_from_slice(&offset.to_ne_bytes());
            p[4..8].copy_from_slice(&len.to_ne_bytes());
            p[8..12].copy_from_slice(&token.to_ne_bytes());
            push_cmsg(out, SOL_SOCKET, ty, &p);
        }
        KernelAbi::Upstream => {
            let id = match (f, id) {
                (Fragment::Linear { .. }, _) => 0,
                (_, Some(id)) => id,
                (_, None) => {
                    return Err(AbiError::NotRepresentable {
                        abi,
                        reason: "upstream pool fragments need a dmabuf id",
                    })
                }
            };
            let mut p = [0u8; 24];
            p[0..8].copy_from_slice(&offset.to_ne_bytes());
            p[8..12].copy_from_slice(&len.to_ne_bytes());
            p[12..16].copy_from_slice(&token.to_ne_bytes());
            p[16..20].copy_from_slice(&id.to_ne_bytes());
            // flags (20..24): reserved, zero.
            push_cmsg(out, SOL_SOCKET, ty, &p);
        }
    }
    Ok(())
}

/// Control buffer bytes that hold `max_frags` fragment cmsgs of `abi`.
pub const fn control_buffer_len_for(abi: KernelAbi, max_frags: usize) -> usize {
    max_frags.saturating_mul(cmsg_space(abi.rx_payload_len()))
}

/// Control buffer bytes that hold `max_frags` fragment cmsgs of either ABI.
pub const fn control_buffer_len(max_frags: usize) -> usize {
    let t = control_buffer_len_for(KernelAbi::Tcpx, max_frags);
    let u = control_buffer_len_for(KernelAbi::Upstream, max_frags);
    if t > u {
        t
    } else {
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockabi::cmsg::cmsg_len;

    fn pool(offset: u64, len: u32, token: u32, dmabuf_id: Option<u32>) -> Fragment {
        Fragment::Pool {
            offset,
            len,
            token,
            dmabuf_id,
        }
    }

    // Bytes laid out by hand from struct devmemvec (tcpx.h), x86-64 LE.
    #[test]
    fn tcpx_bytes_parse_as_the_plugin_reads_them() {
        let mut buf = Vec::new();
        // cmsghdr: len 28, level 1, type 98; payload {0, 100, 0}; 4 pad.
        buf.extend_from_slice(&28u64.to_le_bytes());
        buf.extend_from_slice(&1i32.to_le_bytes());
        buf.extend_from_slice(&98i32.to_le_bytes());
        buf.extend_from_slice(&[0, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // type 99: offset 0x1000, size 4096, token 7.
        buf.extend_from_slice(&28u64.to_le_bytes());
        buf.extend_from_slice(&1i32.to_le_bytes());
        buf.extend_from_slice(&99i32.to_le_bytes());
        buf.extend_from_slice(&0x1000u32.to_le_bytes());
        buf.extend_from_slice(&4096u32.to_le_bytes());
        buf.extend_from_slice(&7u32.to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        let frags = parse_rx(KernelAbi::Tcpx, &buf, 4196, 0).unwrap();
        assert_eq!(
            frags,
            vec![Fragment::Linear { len: 100 }, pool(0x1000, 4096, 7, None)]
        );
        let mut again = Vec::new();
        encode_rx(KernelAbi::Tcpx, &frags, &mut again).unwrap();
        assert_eq!(again, buf);
    }

    // Bytes laid out by hand from struct dmabuf_cmsg (uio.h), x86-64 LE.
    #[test]
    fn upstream_bytes_parse_as_ncdevmem_reads_them() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&40u64.to_le_bytes());
        buf.extend_from_slice(&1i32.to_le_bytes());
        buf.extend_from_slice(&79i32.to_le_bytes());
        buf.extend_from_slice(&0x1_0000_0000u64.to_le_bytes());
        buf.extend_from_slice(&1448u32.to_le_bytes());
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(&5u32.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        let frags = parse_rx(KernelAbi::Upstream, &buf, 1448, 0).unwrap();
        assert_eq!(frags, vec![pool(0x1_0000_0000, 1448, 3, Some(5))]);
        assert_eq!(cmsg_len(24), 40);
    }

    #[test]
    fn ctrunc_is_a_typed_error_and_tokens_can_be_salvaged() {
        let frags = [pool(0, 10, 1, None), pool(10, 10, 2, None)];
        let mut buf = Vec::new();
        encode_rx(KernelAbi::Tcpx, &frags, &mut buf).unwrap();
        let err = parse_rx(KernelAbi::Tcpx, &buf, 20, MSG_CTRUNC).unwrap_err();
        assert!(matches!(err, AbiError::ControlTruncated { .. }), "{err}");
        // A truncated second cmsg: the first token is still found.
        assert_eq!(salvage_tokens(KernelAbi::Tcpx, &buf[..40]), vec![1]);
        assert_eq!(salvage_tokens(KernelAbi::Tcpx, &buf), vec![1, 2]);
    }

    #[test]
    fn accounting_mismatch_is_an_error_and_leaves_out_untouched() {
        let frags = [Fragment::Linear { len: 5 }, pool(0, 10, 1, Some(2))];
        let mut buf = Vec::new();
        encode_rx(KernelAbi::Upstream, &frags, &mut buf).unwrap();
        let mut out = vec![Fragment::Linear { len: 1 }];
        let err = parse_rx_into(KernelAbi::Upstream, &buf, 16, 0, &mut out).unwrap_err();
        assert!(matches!(
            err,
            AbiError::Accounting {
                fragments: 15,
                returned: 16
            }
        ));
        assert_eq!(out, vec![Fragment::Linear { len: 1 }]);
        parse_rx_into(KernelAbi::Upstream, &buf, 15, 0, &mut out).unwrap();
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn the_other_abis_cmsgs_name_the_right_abi() {
        let mut buf = Vec::new();
        encode_rx(KernelAbi::Upstream, &[pool(0, 1, 1, Some(1))], &mut buf).unwrap();
        match parse_rx(KernelAbi::Tcpx, &buf, 1, 0).unwrap_err() {
            AbiError::AbiMismatch {
                expected,
                found,
                ty,
            } => assert_eq!(
                (expected, found, ty),
                (KernelAbi::Tcpx, KernelAbi::Upstream, 79)
            ),
            e => panic!("wrong error {e}"),
        }
    }

    #[test]
    fn unknown_cmsgs_are_errors() {
        let mut buf = Vec::new();
        push_cmsg(&mut buf, SOL_SOCKET, libc::SCM_TIMESTAMP, &[0; 16]);
        let err = parse_rx(KernelAbi::Upstream, &buf, 0, 0).unwrap_err();
        assert!(
            matches!(err, AbiError::UnknownCmsg { level: 1, .. }),
            "{err}"
        );
        let mut buf = Vec::new();
        // Right type, wrong level (SOL_TCP).
        push_cmsg(&mut buf, libc::SOL_TCP, 99, &[0; 12]);
        let err = parse_rx(KernelAbi::Tcpx, &buf, 0, 0).unwrap_err();
        assert!(
            matches!(err, AbiError::UnknownCmsg { level: 6, ty: 99 }),
            "{err}"
        );
    }

    #[test]
    fn short_payload_is_an_error_longer_is_tolerated() {
        let mut buf = Vec::new();
        push_cmsg(&mut buf, SOL_SOCKET, 79, &[0; 20]);
        let err = parse_rx(KernelAbi::Upstream, &buf, 0, 0).unwrap_err();
        assert!(matches!(
            err,
            AbiError::ShortPayload {
                len: 20,
                expected: 24,
                ..
            }
        ));
        let mut buf = Vec::new();
        let mut p = [0u8; 16];
        p[4..8].copy_from_slice(&9u32.to_ne_bytes());
        push_cmsg(&mut buf, SOL_SOCKET, 98, &p);
        assert_eq!(
            parse_rx(KernelAbi::Tcpx, &buf, 9, 0).unwrap(),
            vec![Fragment::Linear { len: 9 }]
        );
    }

    #[test]
    fn encoder_refuses_what_the_abi_cannot_say() {
        let mut out = vec![0xAA];
        let e = encode_rx(KernelAbi::Tcpx, &[pool(1 << 32, 1, 1, None)], &mut out);
        assert!(matches!(e, Err(AbiError::NotRepresentable { .. })));
        let e = encode_rx(KernelAbi::Tcpx, &[pool(0, 1, 1, Some(3))], &mut out);
        assert!(matches!(e, Err(AbiError::NotRepresentable { .. })));
        let e = encode_rx(
            KernelAbi::Upstream,
            &[Fragment::Linear { len: 1 }, pool(0, 1, 1, None)],
            &mut out,
        );
        assert!(matches!(e, Err(AbiError::NotRepresentable { .. })));
        assert_eq!(out, vec![0xAA]);
    }

    #[test]
    fn no_cmsgs_means_plain_bytes_in_the_iov() {
        assert_eq!(parse_rx(KernelAbi::Tcpx, &[], 0, 0).unwrap(), vec![]);
        assert_eq!(
            parse_rx(KernelAbi::Upstream, &[], 1500, 0).unwrap(),
            vec![Fragment::Linear { len: 1500 }]
        );
        let big = u32::MAX as usize + 10;
        assert!(matches!(
            parse_rx(KernelAbi::Tcpx, &[], big, 0),
            Err(AbiError::Accounting { fragments: 0, .. })
        ));
        // But cmsgs that do not add up are still an error.
        let mut buf = Vec::new();
        encode_rx(KernelAbi::Tcpx, &[Fragment::Linear { len: 1 }], &mut buf).unwrap();
        assert!(parse_rx(KernelAbi::Tcpx, &buf, 2, 0).is_err());
    }

    #[test]
    fn control_buffer_len_covers_worst_case() {
        assert_eq!(control_buffer_len_for(KernelAbi::Tcpx, 2), 64);
        assert_eq!(control_buffer_len_for(KernelAbi::Upstream, 2), 80);
        assert_eq!(control_buffer_len(2048), 2048 * 40);
        assert_eq!(control_buffer_len(usize::MAX), usize::MAX);
        for abi in KernelAbi::ALL {
            let frags: Vec<_> = (0..17)
                .map(|i| {
                    pool(
                        i * 4096,
                        4096,
                        i as u32,
                        match abi {
                            KernelAbi::Tcpx => None,
                            KernelAbi::Upstream => Some(1),
                        },
                    )
                })
                .collect();
            let mut buf = Vec::new();
            encode_rx(abi, &frags, &mut buf).unwrap();
            assert_eq!(buf.len(), control_buffer_len_for(abi, 17));
            assert!(buf.len() <= control_buffer_len(17));
        }
    }
}
