//! netdev generic-netlink messages, sans I/O: `bind-rx` / `bind-tx` and
//! `CTRL_CMD_GETFAMILY` requests, and a reply parser that never panics
//! (fuzz target `fuzz/fuzz_targets/netlink_reply.rs`).
#![forbid(unsafe_code)]

use std::os::fd::RawFd;

use super::NetlinkError;

/// `NETLINK_GENERIC` (include/uapi/linux/netlink.h).
pub const NETLINK_GENERIC: i32 = 16;
/// `NLMSG_ERROR`, `NLM_F_REQUEST`, `NLM_F_ACK` (netlink.h).
pub const NLMSG_ERROR: u16 = 2;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
/// `NLA_F_NESTED` (netlink.h).
pub const NLA_F_NESTED: u16 = 0x8000;
/// `GENL_ID_CTRL`, `CTRL_CMD_GETFAMILY`, `CTRL_ATTR_FAMILY_ID`, `CTRL_ATTR_FAMILY_NAME` (genetlink.h).
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// `NETDEV_FAMILY_NAME` / `NETDEV_FAMILY_VERSION` (netdev.h).
pub const NETDEV_FAMILY_NAME: &str = "netdev";
pub const NETDEV_FAMILY_VERSION: u8 = 1;
/// `NETDEV_CMD_BIND_RX` = 13, `NETDEV_CMD_BIND_TX` = 15 (after NAPI_SET = 14) (netdev.h).
pub const NETDEV_CMD_BIND_RX: u8 = 13;
pub const NETDEV_CMD_BIND_TX: u8 = 15;
/// `NETDEV_A_DMABUF_{IFINDEX, QUEUES, FD, ID}` = 1..4 (netdev.h).
pub const NETDEV_A_DMABUF_IFINDEX: u16 = 1;
pub const NETDEV_A_DMABUF_QUEUES: u16 = 2;
pub const NETDEV_A_DMABUF_FD: u16 = 3;
pub const NETDEV_A_DMABUF_ID: u16 = 4;
/// `NETDEV_A_QUEUE_ID` = 1, `NETDEV_A_QUEUE_TYPE` = 3, `NETDEV_QUEUE_TYPE_RX` = 0 (netdev.h).
pub const NETDEV_A_QUEUE_ID: u16 = 1;
pub const NETDEV_A_QUEUE_TYPE: u16 = 3;
pub const NETDEV_QUEUE_TYPE_RX: u32 = 0;

/// `NLM_F_CAPPED`: the error message does not echo the request's payload.
pub const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS`: extended-ack attributes follow the error.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's reason, a NUL-terminated string.
pub const NLMSGERR_ATTR_MSG: u16 = 1;

pub(super) const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn put_attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align4(out.len()), 0);
}

/// A generic-netlink request: nlmsghdr, genlmsghdr, then `attrs`.
fn request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + GENL_HDR + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&family.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills ours in
    b.extend_from_slice(&[cmd, version, 0, 0]);
    b.extend_from_slice(attrs);
    b
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn get_family_request(seq: u32, name: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &z);
    request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, seq, &attrs)
}

/// `netdev bind-rx`: bind `dmabuf_fd` to RX `queues` of `ifindex`.
pub fn bind_rx_request(
    seq: u32,
    family: u16,
    ifindex: u32,
    dmabuf_fd: RawFd,
    queues: &[u32],
) -> Vec<u8> {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, NETDEV_A_DMABUF_IFINDEX, &ifindex.to_ne_bytes());
    put_attr(
        &mut attrs,
        NETDEV_A_DMABUF_FD,
        &(dmabuf_fd as u32).to_ne_bytes(),
    );
    for &q in queues {
        let mut nested = Vec::new();
        put_attr(&mut nested, NETDEV_A_QUEUE_ID, &q.to_ne_bytes());
        put_attr(
            &mut nested,
            NETDEV_A_QUEUE_TYPE,
            &NETDEV_QUEUE_TYPE_RX.to_ne_bytes(),
        );
        put_attr(&mut attrs, NETDEV_A_DMABUF_QUEUES | NLA_F_NESTED, &nested);
    }
    request(
        family,
        NETDEV_CMD_BIND_RX,
        NETDEV_FAMILY_VERSION,
        seq,
        &attrs,
    )
}

/// `netdev bind-tx`: bind `dmabuf_fd` for transmit on `ifindex`.
pub fn bind_tx_request(seq: u32, family: u16, ifindex: u32, dmabuf_fd: RawFd) -> Vec<u8> {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, NETDEV_A_DMABUF_IFINDEX, &ifindex.to_ne_bytes());
    put_attr(
        &mut attrs,
        NETDEV_A_DMABUF_FD,
        &(dmabuf_fd as u32).to_ne_bytes(),
    );
    request(
        family,
        NETDEV_CMD_BIND_TX,
        NETDEV_FAMILY_VERSION,
        seq,
        &attrs,
    )
}

/// One message of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `NLMSG_ERROR` with 0: the acknowledgement.
    Ack,
    /// `NLMSG_ERROR` with a negative errno, and the kernel's reason when
    /// it gave one (extended ack, `NLMSGERR_ATTR_MSG`).
    Error { errno: i32, msg: Option<String> },
    /// A generic-netlink message: its attributes, `(type without flags, payload)`.
    Genl(Vec<(u16, Vec<u8>)>),
}

fn take<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], NetlinkError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| NetlinkError::Malformed(format!("need {N} bytes at {at}, have {}", b.len())))
}

/// Parses every message in a reply datagram. Never panics.
pub fn parse_reply(b: &[u8]) -> Result<Vec<Reply>, NetlinkError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let len = u32::from_ne_bytes(take(b, at)?) as usize;
        let ty = u16::from_ne_bytes(take(b, at + 4)?);
        if len < NLMSG_HDR || at + len > b.len() {
            return Err(NetlinkError::Malformed(format!(
                "message length {len} at {at} of {}",
                b.len()
            )));
        }
        let body = &b[at + NLMSG_HDR..at + len];
        if ty == NLMSG_ERROR {
            let err = i32::from_ne_bytes(take(body, 0)?);
            let flags = u16::from_ne_bytes(take(b, at + 6)?);
            out.push(if err == 0 {
                Reply::Ack
            } else {
                Reply::Error {
                    errno: err,
                    msg: ext_ack_msg(body, flags)?,
                }
            });
        } else {
            let attrs = body.get(GENL_HDR..).ok_or_else(|| {
                NetlinkError::Malformed("generic-netlink header cut short".into())
            })?;
            out.push(Reply::Genl(parse_attrs(attrs)?));
        }
        at += align4(len);
    }
    Ok(out)
}

/// The reason in an error's extended-ack attributes: after the error code
/// and the request's header (and, unless capped, its payload).
fn ext_ack_msg(body: &[u8], flags: u16) -> Result<Option<String>, NetlinkError> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return Ok(None);
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDR
    } else {
        (u32::from_ne_bytes(take(body, 4)?) as usize).max(NLMSG_HDR)
    };
    let tlvs = body.get(align4(4 + echoed)..).unwrap_or(&[]);
    Ok(parse_attrs(tlvs)?
        .into_iter()
        .find(|(t, _)| *t == NLMSGERR_ATTR_MSG)
        .map(|(_, p)| {
            let text = p.split(|b| *b == 0).next().unwrap_or(&[]);
            String::from_utf8_lossy(text).into_owned()
        }))
}

fn parse_attrs(mut b: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, NetlinkError> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes(take(b, 0)?) as usize;
        let ty = u16::from_ne_bytes(take(b, 2)?) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            return Err(NetlinkError::Malformed(format!(
                "attribute length {len} of {}",
                b.len()
            )));
        }
        out.push((ty, b[4..len].to_vec()));
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

pub(super) fn attr_u32(attrs: &[(u16, Vec<u8>)], ty: u16) -> Option<u32> {
    attrs
        .iter()
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| p.get(..4))
        .map(|p| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
}

pub(super) fn attr_u16(attrs: &[(u16, Vec<u8>)], ty: u16) -> Option<u16> {
    attrs
        .iter()
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| p.get(..2))
        .map(|p| u16::from_ne_bytes([p[0], p[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bind_rx_golden_bytes() {
        // nlmsghdr (16) + genlmsghdr (4) + IFINDEX (8) + FD (8) + QUEUES nest (4 + 8 + 8 = 20) = 56.
        let b = bind_rx_request(7, 0x1b, 2, 5, &[3]);
        let mut want: Vec<u8> = Vec::new();
        want.extend(56u32.to_ne_bytes()); // nlmsg_len
        want.extend(0x1bu16.to_ne_bytes()); // the netdev family id
        want.extend(5u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
        want.extend(7u32.to_ne_bytes()); // seq
        want.extend(0u32.to_ne_bytes()); // pid
        want.extend([13, 1, 0, 0]); // NETDEV_CMD_BIND_RX, version 1
        want.extend(8u16.to_ne_bytes()); // nla_len
        want.extend(1u16.to_ne_bytes()); // NETDEV_A_DMABUF_IFINDEX
        want.extend(2u32.to_ne_bytes());
        want.extend(8u16.to_ne_bytes());
        want.extend(3u16.to_ne_bytes()); // NETDEV_A_DMABUF_FD
        want.extend(5u32.to_ne_bytes());
        want.extend(20u16.to_ne_bytes());
        want.extend((2u16 | 0x8000).to_ne_bytes()); // NETDEV_A_DMABUF_QUEUES | NLA_F_NESTED
        want.extend(8u16.to_ne_bytes());
        want.extend(1u16.to_ne_bytes()); // NETDEV_A_QUEUE_ID
        want.extend(3u32.to_ne_bytes());
        want.extend(8u16.to_ne_bytes());
        want.extend(3u16.to_ne_bytes()); // NETDEV_A_QUEUE_TYPE
        want.extend(0u32.to_ne_bytes()); // NETDEV_QUEUE_TYPE_RX
        assert_eq!(b, want);
        let tx = bind_tx_request(1, 0x1b, 2, 5);
        assert_eq!(tx.len(), 36);
        assert_eq!(tx[16], 15, "NETDEV_CMD_BIND_TX");
    }

    #[test]
    fn family_request_is_padded() {
        let b = get_family_request(1, "netdev");
        // 20 bytes of headers + nla (4 + 7 = 11 → 12).
        assert_eq!(b.len(), 32);
        assert_eq!(&b[24..31], b"netdev\0");
    }

    #[test]
    fn error_and_attribute_replies_parse() {
        let mut b = Vec::new();
        b.extend(36u32.to_ne_bytes());
        b.extend(NLMSG_ERROR.to_ne_bytes());
        b.extend([0u8; 10]);
        b.extend((-libc::EOPNOTSUPP).to_ne_bytes());
        b.extend([0u8; 16]);
        assert_eq!(
            parse_reply(&b).unwrap(),
            vec![Reply::Error {
                errno: -libc::EOPNOTSUPP,
                msg: None
            }]
        );
        assert!(parse_reply(&b[..20]).is_err());
    }

    /// The fuzz target's seeds (fuzz/seeds/netlink_reply) are these tests'
    /// golden bytes, in this machine's byte order.
    #[cfg(target_endian = "little")]
    #[test]
    fn fuzz_seeds_hold_the_golden_bytes() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/netlink_reply");
        let seed = |n: &str| std::fs::read(dir.join(format!("{n}.bin"))).unwrap();
        assert_eq!(
            seed("bind_rx_request"),
            bind_rx_request(7, 0x1b, 2, 5, &[3])
        );
        assert_eq!(seed("get_family_request"), get_family_request(1, "netdev"));
        assert_eq!(
            parse_reply(&seed("error_eopnotsupp")).unwrap(),
            [Reply::Error {
                errno: -libc::EOPNOTSUPP,
                msg: None
            }]
        );
        assert_eq!(parse_reply(&seed("ack")).unwrap(), [Reply::Ack]);
        let r = parse_reply(&seed("family_reply_then_ack")).unwrap();
        let [Reply::Genl(attrs), Reply::Ack] = &r[..] else {
            panic!("{r:?}")
        };
        assert_eq!(attr_u16(attrs, CTRL_ATTR_FAMILY_ID), Some(0x1b));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_reply(&b);
        }
    }

    /// An error with an extended ack, as the kernel sends it with
    /// NETLINK_EXT_ACK and NETLINK_CAP_ACK set: the error code, the request's
    /// header only (capped), then `NLMSGERR_ATTR_MSG`.
    #[test]
    fn the_kernels_reason_is_read_from_the_extended_ack() {
        let reason = b"tcp-data-split is disabled\0";
        let tlv_len = 4 + reason.len();
        let len = NLMSG_HDR + 4 + NLMSG_HDR + align4(tlv_len);
        let mut b = Vec::new();
        b.extend((len as u32).to_ne_bytes());
        b.extend(NLMSG_ERROR.to_ne_bytes());
        b.extend((NLM_F_CAPPED | NLM_F_ACK_TLVS).to_ne_bytes());
        b.extend([0u8; 8]);
        b.extend((-libc::EINVAL).to_ne_bytes());
        b.extend(56u32.to_ne_bytes()); // the request's nlmsg_len, not echoed
        b.extend([0u8; 12]);
        b.extend((tlv_len as u16).to_ne_bytes());
        b.extend(NLMSGERR_ATTR_MSG.to_ne_bytes());
        b.extend(reason);
        b.resize(len, 0);
        assert_eq!(
            parse_reply(&b).unwrap(),
            [Reply::Error {
                errno: -libc::EINVAL,
                msg: Some("tcp-data-split is disabled".into())
            }]
        );
        // Without NLM_F_ACK_TLVS there is no reason to read.
        b[6..8].copy_from_slice(&0u16.to_ne_bytes());
        assert_eq!(
            parse_reply(&b).unwrap(),
            [Reply::Error {
                errno: -libc::EINVAL,
                msg: None
            }]
        );
    }
}
