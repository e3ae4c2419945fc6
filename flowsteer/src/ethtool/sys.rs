//! `#[repr(C)]` mirrors of `include/uapi/linux/ethtool.h` and the ioctl.
//!
//! Sizes and offsets on x86-64 (checked against the C header by
//! `tests/ethtool_layout.rs`, and by hand below):
//! - `ethtool_tcpip4_spec`: ip4src 0, ip4dst 4, psrc 8, pdst 10, tos 12; size 16.
//! - `ethtool_tcpip6_spec`: ip6src 0, ip6dst 16, psrc 32, pdst 34, tclass 36; size 40.
//! - `union ethtool_flow_union`: `hdata[52]` is the largest member; size 52, align 4.
//! - `ethtool_flow_ext`: padding 0, h_dest 2, vlan_etype 8, vlan_tci 10, data 12; size 20.
//! - `ethtool_rx_flow_spec`: flow_type 0, h_u 4, h_ext 56, m_u 76, m_ext 128,
//!   ring_cookie 152 (8-aligned after 148), location 160; size 168.
//! - `ethtool_rxnfc`: cmd 0, flow_type 4, data 8, fs 16, rule_cnt 184; size 192
//!   (the flexible `rule_locs[]` adds nothing).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SIOCETHTOOL` (`include/uapi/linux/sockios.h`).
pub const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_GRXCLSRLCNT`: rule count and table size.
pub const ETHTOOL_GRXCLSRLCNT: u32 = 0x2e;
/// `ETHTOOL_GRXCLSRLALL`: all rule locations.
pub const ETHTOOL_GRXCLSRLALL: u32 = 0x30;
/// `ETHTOOL_SRXCLSRLDEL`: delete a rule.
pub const ETHTOOL_SRXCLSRLDEL: u32 = 0x31;
/// `ETHTOOL_SRXCLSRLINS`: insert a rule.
pub const ETHTOOL_SRXCLSRLINS: u32 = 0x32;
/// `TCP_V4_FLOW`.
pub const TCP_V4_FLOW: u32 = 0x01;
/// `TCP_V6_FLOW`.
pub const TCP_V6_FLOW: u32 = 0x05;
/// `RX_CLS_LOC_SPECIAL`: flag in GRXCLSRLCNT's `data` when special locations work.
pub const RX_CLS_LOC_SPECIAL: u32 = 0x8000_0000;
/// `RX_CLS_LOC_ANY`: let the driver pick the location.
pub const RX_CLS_LOC_ANY: u32 = 0xffff_ffff;
/// `IFNAMSIZ`.
pub const IFNAMSIZ: usize = 16;

/// `union ethtool_flow_union`, held as its `hdata[52]` member.
///
/// Plain bytes avoid unsafe union reads; [`Self::tcp_ip4`] and
/// [`Self::tcp_ip6`] write the `tcp_ip4_spec` / `tcp_ip6_spec` layouts.
#[repr(C, align(4))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthtoolFlowUnion {
    /// Raw bytes; multi-byte fields are big-endian, as in `__be32`/`__be16`.
    pub hdata: [u8; 52],
}

impl Default for EthtoolFlowUnion {
    fn default() -> Self {
        EthtoolFlowUnion { hdata: [0; 52] }
    }
}

impl EthtoolFlowUnion {
    /// `ethtool_tcpip4_spec { ip4src, ip4dst, psrc, pdst, tos }`.
    pub fn tcp_ip4(src: [u8; 4], dst: [u8; 4], psrc: u16, pdst: u16, tos: u8) -> Self {
        let mut u = Self::default();
        u.hdata[0..4].copy_from_slice(&src);
        u.hdata[4..8].copy_from_slice(&dst);
        u.hdata[8..10].copy_from_slice(&psrc.to_be_bytes());
        u.hdata[10..12].copy_from_slice(&pdst.to_be_bytes());
        u.hdata[12] = tos;
        u
    }

    /// `ethtool_tcpip6_spec { ip6src, ip6dst, psrc, pdst, tclass }`.
    pub fn tcp_ip6(src: [u8; 16], dst: [u8; 16], psrc: u16, pdst: u16, tclass: u8) -> Self {
        let mut u = Self::default();
        u.hdata[0..16].copy_from_slice(&src);
        u.hdata[16..32].copy_from_slice(&dst);
        u.hdata[32..34].copy_from_slice(&psrc.to_be_bytes());
        u.hdata[34..36].copy_from_slice(&pdst.to_be_bytes());
        u.hdata[36] = tclass;
        u
    }
}

/// `struct ethtool_flow_ext`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EthtoolFlowExt {
    /// Reserved.
    pub padding: [u8; 2],
    /// Destination MAC (with `FLOW_MAC_EXT`).
    pub h_dest: [u8; 6],
    /// `__be16 vlan_etype`.
    pub vlan_etype: u16,
    /// `__be16 vlan_tci`.
    pub vlan_tci: u16,
    /// `__be32 data[2]`.
    pub data: [u32; 2],
}

/// `struct ethtool_rx_flow_spec`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EthtoolRxFlowSpec {
    /// e.g. [`TCP_V4_FLOW`].
    pub flow_type: u32,
    /// Values to match.
    pub h_u: EthtoolFlowUnion,
    /// Extra values (with `FLOW_EXT`).
    pub h_ext: EthtoolFlowExt,
    /// Masks: 1-bits are matched (unlike the old ntuple API).
    pub m_u: EthtoolFlowUnion,
    /// Extra masks.
    pub m_ext: EthtoolFlowExt,
    /// RX queue index.
    pub ring_cookie: u64,
    /// Rule location, or [`RX_CLS_LOC_ANY`].
    pub location: u32,
}

/// `struct ethtool_rxnfc` without its flexible `rule_locs[]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EthtoolRxnfc {
    /// `ETHTOOL_*` command.
    pub cmd: u32,
    /// Flow type for hash commands.
    pub flow_type: u32,
    /// Command-dependent value.
    pub data: u64,
    /// The rule.
    pub fs: EthtoolRxFlowSpec,
    /// `rule_cnt` / `rss_context` union.
    pub rule_cnt: u32,
}

/// Most rule locations [`EthtoolRxnfcLocs`] can hold.
pub const MAX_RULE_LOCS: usize = 4096;

/// `struct ethtool_rxnfc` with room for `rule_locs[]`, for `ETHTOOL_GRXCLSRLALL`.
///
/// `rule_locs` starts at 188, inside the padding of [`EthtoolRxnfc`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthtoolRxnfcLocs {
    /// `ETHTOOL_GRXCLSRLALL`.
    pub cmd: u32,
    /// Unused.
    pub flow_type: u32,
    /// Table size on return.
    pub data: u64,
    /// Unused.
    pub fs: EthtoolRxFlowSpec,
    /// Array size on entry, rules on return.
    pub rule_cnt: u32,
    /// Locations of the rules.
    pub rule_locs: [u32; MAX_RULE_LOCS],
}

impl Default for EthtoolRxnfcLocs {
    fn default() -> Self {
        EthtoolRxnfcLocs {
            cmd: 0,
            flow_type: 0,
            data: 0,
            fs: EthtoolRxFlowSpec::default(),
            rule_cnt: 0,
            rule_locs: [0; MAX_RULE_LOCS],
        }
    }
}

/// `ifr_name` for `name`, or `None` if it cannot be one.
pub fn ifr_name(name: &str) -> Option<[libc::c_char; IFNAMSIZ]> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
        return None;
    }
    let mut out = [0 as libc::c_char; IFNAMSIZ];
    for (o, &c) in out.iter_mut().zip(b) {
        *o = c as libc::c_char;
    }
    Some(out)
}

/// `ioctl(sock, SIOCETHTOOL, &ifreq { name, ifr_data = cmd })`.
///
/// `sock` is any AF_INET socket; the interface is looked up in the network
/// namespace the socket was created in. `cmd` must start with an `ethtool_*`
/// command word the kernel copies at most `size_of::<T>()` bytes for.
pub fn ethtool_ioctl<T: EthtoolCmd>(
    sock: BorrowedFd<'_>,
    name: [libc::c_char; IFNAMSIZ],
    cmd: &mut T,
) -> io::Result<()> {
    let mut ifr = libc::ifreq {
        ifr_name: name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru {
            ifru_data: (cmd as *mut T).cast::<libc::c_char>(),
        },
    };
    // SAFETY: `ifr` is a complete ifreq whose ifr_data points at `cmd`, an
    // exclusively borrowed repr(C) ethtool struct that outlives the call and
    // is as large as what the kernel copies in and out for its command.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut ifr) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marker for the ethtool command structs [`ethtool_ioctl`] may pass.
pub trait EthtoolCmd: sealed::Sealed {}
impl EthtoolCmd for EthtoolRxnfc {}
impl EthtoolCmd for EthtoolRxnfcLocs {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::EthtoolRxnfc {}
    impl Sealed for super::EthtoolRxnfcLocs {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    // Hand-computed from the header (see the module comment).
    #[test]
    fn layout_matches_hand_computed_header_values() {
        assert_eq!(
            (
                size_of::<EthtoolFlowUnion>(),
                align_of::<EthtoolFlowUnion>()
            ),
            (52, 4)
        );
        assert_eq!(size_of::<EthtoolFlowExt>(), 20);
        assert_eq!(offset_of!(EthtoolFlowExt, h_dest), 2);
        assert_eq!(offset_of!(EthtoolFlowExt, vlan_etype), 8);
        assert_eq!(offset_of!(EthtoolFlowExt, data), 12);
        assert_eq!(offset_of!(EthtoolRxFlowSpec, h_u), 4);
        assert_eq!(offset_of!(EthtoolRxFlowSpec, h_ext), 56);
        assert_eq!(offset_of!(EthtoolRxFlowSpec, m_u), 76);
        assert_eq!(offset_of!(EthtoolRxFlowSpec, m_ext), 128);
        assert_eq!(offset_of!(EthtoolRxFlowSpec, ring_cookie), 152);
        assert_eq!(offset_of!(EthtoolRxFlowSpec, location), 160);
        assert_eq!(size_of::<EthtoolRxFlowSpec>(), 168);
        assert_eq!(offset_of!(EthtoolRxnfc, data), 8);
        assert_eq!(offset_of!(EthtoolRxnfc, fs), 16);
        assert_eq!(offset_of!(EthtoolRxnfc, rule_cnt), 184);
        assert_eq!(size_of::<EthtoolRxnfc>(), 192);
        assert_eq!(offset_of!(EthtoolRxnfcLocs, rule_cnt), 184);
        assert_eq!(offset_of!(EthtoolRxnfcLocs, rule_locs), 188);
        assert_eq!(size_of::<libc::ifreq>(), 40);
    }

    #[test]
    fn constants_match_header_and_libc() {
        assert_eq!(SIOCETHTOOL, libc::SIOCETHTOOL);
        assert_eq!(SIOCETHTOOL, 0x8946);
        assert_eq!(ETHTOOL_SRXCLSRLINS, 0x32);
        assert_eq!(ETHTOOL_SRXCLSRLDEL, 0x31);
        assert_eq!(ETHTOOL_GRXCLSRLCNT, 0x2e);
        assert_eq!(ETHTOOL_GRXCLSRLALL, 0x30);
        assert_eq!((TCP_V4_FLOW, TCP_V6_FLOW), (1, 5));
        assert_eq!(RX_CLS_LOC_ANY, 0xffffffff);
        assert_eq!(RX_CLS_LOC_SPECIAL, 0x80000000);
        assert_eq!(IFNAMSIZ, libc::IFNAMSIZ);
    }

    #[test]
    fn tcp4_spec_bytes_are_network_order() {
        let u = EthtoolFlowUnion::tcp_ip4([10, 0, 0, 1], [10, 0, 0, 2], 0x1234, 80, 0);
        assert_eq!(
            &u.hdata[..13],
            &[10, 0, 0, 1, 10, 0, 0, 2, 0x12, 0x34, 0, 80, 0]
        );
        let u = EthtoolFlowUnion::tcp_ip6([1; 16], [2; 16], 1, 2, 3);
        assert_eq!(&u.hdata[30..37], &[2, 2, 0, 1, 0, 2, 3]);
    }

    #[test]
    fn ifr_names_are_checked() {
        assert!(ifr_name("eth0").is_some());
        assert!(ifr_name("").is_none());
        assert!(ifr_name("a\0b").is_none());
        assert!(ifr_name("fifteen-chars-x").is_some());
        assert!(ifr_name("sixteen-chars-xx").is_none());
    }
}
