//! Zero-copy completions: the control bytes of `recvmsg(MSG_ERRQUEUE)`.
//!
//! Devmem TX sends with `MSG_ZEROCOPY`; the kernel tells when the NIC let go
//! of the DMA-BUF bytes with one error-queue record per completed id range
//! (`Documentation/networking/msg_zerocopy.rst`). A record is one cmsg,
//! `SOL_IP / IP_RECVERR` (IPv4 sockets) or `SOL_IPV6 / IPV6_RECVERR`, whose
//! payload is `struct sock_extended_err` (`include/uapi/linux/errqueue.h`)
//! followed by the offender address, zero for zero-copy records
//! (`net/ipv4/ip_sockglue.c` `ip_recv_error`, `net/ipv6/datagram.c`
//! `ipv6_recv_error`). The range is `[ee_info, ee_data]`, inclusive.
#![forbid(unsafe_code)]

use super::cmsg::{array, push_cmsg, RawCmsgs};
use super::AbiError;

/// `SOL_IP` (`include/linux/socket.h`).
pub const SOL_IP: i32 = 0;
/// `IP_RECVERR` (`include/uapi/linux/in.h`).
pub const IP_RECVERR: i32 = 11;
/// `SOL_IPV6` (`include/linux/socket.h`).
pub const SOL_IPV6: i32 = 41;
/// `IPV6_RECVERR` (`include/uapi/linux/in6.h`).
pub const IPV6_RECVERR: i32 = 25;
/// `SO_EE_ORIGIN_ZEROCOPY` (`include/uapi/linux/errqueue.h`).
pub const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied after all.
pub const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// `sizeof(struct sock_extended_err)`.
pub const SOCK_EE_LEN: usize = 16;
/// `sizeof(struct sockaddr_in)`, the IPv4 offender.
pub const OFFENDER_V4_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`, the IPv6 offender.
pub const OFFENDER_V6_LEN: usize = 28;

/// Ids `lo..=hi` of `sendmsg(MSG_ZEROCOPY)` calls are complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZcRange {
    /// First id (`ee_info`).
    pub lo: u32,
    /// Last id, inclusive (`ee_data`).
    pub hi: u32,
    /// The kernel copied the bytes instead (`SO_EE_CODE_ZEROCOPY_COPIED`).
    pub copied: bool,
}

impl ZcRange {
    /// Ids the range covers (1 ..= 2^32, wrapping).
    pub fn count(&self) -> u64 {
        u64::from(self.hi.wrapping_sub(self.lo)) + 1
    }
}

/// One error-queue record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrRecord {
    /// A zero-copy completion.
    Zerocopy(ZcRange),
    /// Any other record (an ICMP error, a local error): `ee_errno` and `ee_origin`.
    Other {
        /// `ee_errno`.
        errno: u32,
        /// `ee_origin`.
        origin: u8,
    },
}

/// Parses the control bytes of one `recvmsg(MSG_ERRQUEUE)` (exactly
/// `msg_controllen` bytes). Cmsgs other than `IP_RECVERR` / `IPV6_RECVERR`
/// (timestamps a socket option asked for) are skipped.
pub fn parse_errqueue(control: &[u8]) -> Result<Vec<ErrRecord>, AbiError> {
    let mut out = Vec::new();
    for c in RawCmsgs::new(control) {
        let c = c?;
        let recverr = (c.level == SOL_IP && c.ty == IP_RECVERR)
            || (c.level == SOL_IPV6 && c.ty == IPV6_RECVERR);
        if !recverr {
            continue;
        }
        let Some(ee) = c.data.get(..SOCK_EE_LEN) else {
            return Err(AbiError::Malformed {
                offset: c.offset,
                reason: "an IP_RECVERR cmsg shorter than struct sock_extended_err",
            });
        };
        let errno = u32::from_ne_bytes(array(&ee[0..4]));
        let (origin, code) = (ee[4], ee[6]);
        let info = u32::from_ne_bytes(array(&ee[8..12]));
        let data = u32::from_ne_bytes(array(&ee[12..16]));
        out.push(if origin == SO_EE_ORIGIN_ZEROCOPY && errno == 0 {
            ErrRecord::Zerocopy(ZcRange {
                lo: info,
                hi: data,
                copied: code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
            })
        } else {
            ErrRecord::Other { errno, origin }
        });
    }
    Ok(out)
}

/// Appends the record the kernel writes for a zero-copy completion on an
/// IPv4 (`v6 = false`) or IPv6 socket: the inverse of [`parse_errqueue`].
pub fn encode_zerocopy(range: ZcRange, v6: bool, out: &mut Vec<u8>) {
    let (level, ty, offender) = if v6 {
        (SOL_IPV6, IPV6_RECVERR, OFFENDER_V6_LEN)
    } else {
        (SOL_IP, IP_RECVERR, OFFENDER_V4_LEN)
    };
    let mut p = vec![0u8; SOCK_EE_LEN + offender];
    // ee_errno 0; ee_origin; ee_type 0; ee_code; ee_pad 0; ee_info; ee_data.
    p[4] = SO_EE_ORIGIN_ZEROCOPY;
    p[6] = if range.copied {
        SO_EE_CODE_ZEROCOPY_COPIED
    } else {
        0
    };
    p[8..12].copy_from_slice(&range.lo.to_ne_bytes());
    p[12..16].copy_from_slice(&range.hi.to_ne_bytes());
    push_cmsg(out, level, ty, &p);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockabi::cmsg::cmsg_space;

    #[test]
    fn constants_match_libc() {
        assert_eq!(IP_RECVERR, libc::IP_RECVERR);
        assert_eq!(IPV6_RECVERR, libc::IPV6_RECVERR);
        assert_eq!(SOL_IP, libc::SOL_IP);
        assert_eq!(SOL_IPV6, libc::SOL_IPV6);
        assert_eq!(SOCK_EE_LEN, std::mem::size_of::<libc::sock_extended_err>());
        assert_eq!(OFFENDER_V4_LEN, std::mem::size_of::<libc::sockaddr_in>());
        assert_eq!(OFFENDER_V6_LEN, std::mem::size_of::<libc::sockaddr_in6>());
    }

    // A record as ip_recv_error writes it: cmsg_len 48, SOL_IP, IP_RECVERR,
    // ee {errno 0, origin 5, type 0, code 1, pad 0, info 7, data 9}, zero offender.
    #[test]
    fn ipv4_record_bytes() {
        let mut b = Vec::new();
        encode_zerocopy(
            ZcRange {
                lo: 7,
                hi: 9,
                copied: true,
            },
            false,
            &mut b,
        );
        let mut want = Vec::new();
        want.extend(48u64.to_le_bytes());
        want.extend(0i32.to_le_bytes());
        want.extend(11i32.to_le_bytes());
        want.extend([0, 0, 0, 0, 5, 0, 1, 0]);
        want.extend(7u32.to_le_bytes());
        want.extend(9u32.to_le_bytes());
        want.extend([0u8; 16]);
        assert_eq!(b, want);
        let r = parse_errqueue(&b).unwrap();
        assert_eq!(
            r,
            [ErrRecord::Zerocopy(ZcRange {
                lo: 7,
                hi: 9,
                copied: true
            })]
        );
        let mut v6 = Vec::new();
        encode_zerocopy(
            ZcRange {
                lo: u32::MAX,
                hi: 1,
                copied: false,
            },
            true,
            &mut v6,
        );
        assert_eq!(v6.len(), cmsg_space(44));
        let [ErrRecord::Zerocopy(z)] = parse_errqueue(&v6).unwrap()[..] else {
            panic!("one zero-copy record")
        };
        assert_eq!(z.count(), 3, "ranges wrap at 2^32");
    }

    /// The fuzz target's seeds (fuzz/seeds/devmem_errqueue) are these
    /// tests' golden records, in this machine's byte order.
    #[cfg(target_endian = "little")]
    #[test]
    fn fuzz_seeds_hold_the_golden_records() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/devmem_errqueue");
        let seed = |n: &str| std::fs::read(dir.join(format!("{n}.bin"))).unwrap();
        for (name, lo, hi, copied, v6) in [
            ("zerocopy_v4", 7, 9, true, false),
            ("zerocopy_v6", u32::MAX, 1, false, true),
        ] {
            let mut want = Vec::new();
            let z = ZcRange { lo, hi, copied };
            encode_zerocopy(z, v6, &mut want);
            assert_eq!(seed(name), want, "{name}");
            crate::sockabi::fuzzing::fuzz_errqueue(&want);
        }
    }

    #[test]
    fn other_records_and_cmsgs_are_told_apart() {
        let mut b = Vec::new();
        // A timestamp cmsg is skipped.
        push_cmsg(&mut b, 1, libc::SCM_TIMESTAMPING, &[0; 48]);
        let mut ee = [0u8; 32];
        ee[0..4].copy_from_slice(&(libc::EHOSTUNREACH as u32).to_ne_bytes());
        ee[4] = 2; // SO_EE_ORIGIN_ICMP
        push_cmsg(&mut b, SOL_IP, IP_RECVERR, &ee);
        assert_eq!(
            parse_errqueue(&b).unwrap(),
            [ErrRecord::Other {
                errno: libc::EHOSTUNREACH as u32,
                origin: 2
            }]
        );
        let mut short = Vec::new();
        push_cmsg(&mut short, SOL_IP, IP_RECVERR, &[0; 8]);
        assert!(matches!(
            parse_errqueue(&short),
            Err(AbiError::Malformed { .. })
        ));
    }
}
