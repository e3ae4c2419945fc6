//! Upstream devmem binding over generic netlink (Linux ≥ 6.12 RX, ≥ 6.15 TX):
//! the `netdev` family's `bind-rx` / `bind-tx` operations, built and parsed
//! here, sans I/O, plus a thin socket layer. The kernel keeps a binding as
//! long as the netlink socket that made it stays open, so [`Binding`] owns it.
//!
//! Constants: include/uapi/linux/netlink.h, genetlink.h, netdev.h (generated
//! from Documentation/netlink/specs/netdev.yaml).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

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

const NLMSG_HDR: usize = 16;
const GENL_HDR: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetlinkError {
    #[error("the kernel has no `netdev` generic-netlink family (devmem RX needs Linux ≥ 6.12, TX ≥ 6.15)")]
    NoFamily,
    #[error("no network interface named {0:?}")]
    NoSuchInterface(String),
    #[error("NIC {ifname} does not support devmem {dir} ({errno}): it needs header split, flow steering and the queue API (upstream devmem TCP drivers)")]
    NotSupported {
        ifname: String,
        dir: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("binding a DMA-BUF to {ifname}: fd {fd} is not a DMA-BUF the NIC can use ({errno})")]
    BadDmabuf {
        ifname: String,
        fd: RawFd,
        errno: nix::errno::Errno,
    },
    #[error("{op} needs CAP_NET_ADMIN")]
    PermissionDenied { op: &'static str },
    #[error("kernel refused {op}: {errno}")]
    Kernel {
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
    #[error("no netlink reply within {0:?}")]
    TimedOut(Duration),
    #[error("netlink socket: {0}")]
    Io(#[from] crate::error::OsError),
}

impl From<std::io::Error> for NetlinkError {
    fn from(e: std::io::Error) -> Self {
        NetlinkError::Io(e.into())
    }
}

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
    /// `NLMSG_ERROR` with a negative errno.
    Error(i32),
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
            out.push(if err == 0 {
                Reply::Ack
            } else {
                Reply::Error(err)
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

fn attr_u32(attrs: &[(u16, Vec<u8>)], ty: u16) -> Option<u32> {
    attrs
        .iter()
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| p.get(..4))
        .map(|p| u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
}

fn attr_u16(attrs: &[(u16, Vec<u8>)], ty: u16) -> Option<u16> {
    attrs
        .iter()
        .find(|(t, _)| *t == ty)
        .and_then(|(_, p)| p.get(..2))
        .map(|p| u16::from_ne_bytes([p[0], p[1]]))
}

/// A generic-netlink socket with a receive deadline.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    deadline: Duration,
}

impl GenlSocket {
    pub fn open(deadline: Duration) -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: deadline.as_secs() as libc::time_t,
            tv_usec: deadline.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid fd and a timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(GenlSocket {
            fd,
            seq: 1,
            deadline,
        })
    }

    /// Sends `build(seq)` and collects the reply up to the acknowledgement.
    fn call(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> Result<Vec<Reply>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = build(self.seq);
        // SAFETY: a zeroed sockaddr_nl (pid 0 = the kernel) of the size passed; msg is valid.
        let rc = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut all = Vec::new();
        loop {
            let mut buf = vec![0u8; 16384];
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return Err(match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        NetlinkError::TimedOut(self.deadline)
                    }
                    _ => e.into(),
                });
            }
            let replies = parse_reply(&buf[..n as usize])?;
            let done = replies.iter().any(|r| !matches!(r, Reply::Genl(_)));
            all.extend(replies);
            if done {
                return Ok(all);
            }
        }
    }

    /// The id of generic-netlink family `name`; `None` if the kernel lacks it.
    pub fn family_id(&mut self, name: &str) -> Result<Option<u16>, NetlinkError> {
        let replies = self.call(|seq| get_family_request(seq, name))?;
        for r in &replies {
            match r {
                Reply::Error(e) if -*e == libc::ENOENT => return Ok(None),
                Reply::Error(e) => {
                    return Err(NetlinkError::Kernel {
                        op: "CTRL_CMD_GETFAMILY",
                        errno: nix::errno::Errno::from_raw(-e),
                    })
                }
                Reply::Genl(attrs) => {
                    if let Some(id) = attr_u16(attrs, CTRL_ATTR_FAMILY_ID) {
                        return Ok(Some(id));
                    }
                }
                Reply::Ack => {}
            }
        }
        Err(NetlinkError::Malformed(
            "family reply without CTRL_ATTR_FAMILY_ID".into(),
        ))
    }
}

/// A DMA-BUF bound to a NIC; the kernel unbinds it when this is dropped
/// (its netlink socket closes).
pub struct Binding {
    _socket: GenlSocket,
    /// The binding id the kernel reports in devmem cmsgs (`dmabuf_id`); 0 for TX.
    pub dmabuf_id: u32,
}

fn bind(
    ifname: &str,
    dmabuf_fd: RawFd,
    queues: Option<&[u32]>,
    deadline: Duration,
) -> Result<Binding, NetlinkError> {
    let ifindex = nix::net::if_::if_nametoindex(ifname)
        .map_err(|_| NetlinkError::NoSuchInterface(ifname.to_string()))?;
    let mut s = GenlSocket::open(deadline)?;
    let family = s
        .family_id(NETDEV_FAMILY_NAME)?
        .ok_or(NetlinkError::NoFamily)?;
    let (op, dir) = if queues.is_some() {
        ("netdev bind-rx", "RX")
    } else {
        ("netdev bind-tx", "TX")
    };
    let replies = s.call(|seq| match queues {
        Some(q) => bind_rx_request(seq, family, ifindex, dmabuf_fd, q),
        None => bind_tx_request(seq, family, ifindex, dmabuf_fd),
    })?;
    let mut id = None;
    for r in &replies {
        match r {
            Reply::Error(e) => {
                let errno = nix::errno::Errno::from_raw(-e);
                return Err(match errno {
                    nix::errno::Errno::EPERM => NetlinkError::PermissionDenied { op },
                    nix::errno::Errno::EBADF => NetlinkError::BadDmabuf {
                        ifname: ifname.to_string(),
                        fd: dmabuf_fd,
                        errno,
                    },
                    _ => NetlinkError::NotSupported {
                        ifname: ifname.to_string(),
                        dir,
                        errno,
                    },
                });
            }
            Reply::Genl(attrs) => id = attr_u32(attrs, NETDEV_A_DMABUF_ID).or(id),
            Reply::Ack => {}
        }
    }
    Ok(Binding {
        _socket: s,
        dmabuf_id: id.unwrap_or(0),
    })
}

/// Binds `dmabuf_fd` to RX `queues` of `ifname` (upstream devmem RX).
pub fn bind_rx(
    ifname: &str,
    dmabuf_fd: RawFd,
    queues: &[u32],
    deadline: Duration,
) -> Result<Binding, NetlinkError> {
    bind(ifname, dmabuf_fd, Some(queues), deadline)
}

/// Binds `dmabuf_fd` for devmem TX on `ifname` (Linux ≥ 6.15).
pub fn bind_tx(
    ifname: &str,
    dmabuf_fd: RawFd,
    deadline: Duration,
) -> Result<Binding, NetlinkError> {
    bind(ifname, dmabuf_fd, None, deadline)
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
            vec![Reply::Error(-libc::EOPNOTSUPP)]
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
            [Reply::Error(-libc::EOPNOTSUPP)]
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

    #[test]
    fn binding_lo_is_a_clear_error_naming_it() {
        let mut s = match GenlSocket::open(Duration::from_secs(2)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipped: no generic netlink socket here ({e})");
                return;
            }
        };
        match s.family_id(NETDEV_FAMILY_NAME) {
            Ok(Some(_)) => {}
            Ok(None) => {
                eprintln!("skipped: kernel without the netdev family");
                return;
            }
            Err(e) => panic!("family lookup failed: {e}"),
        }
        let memfd = nix::sys::memfd::memfd_create(
            c"tcpx-not-a-dmabuf",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        let e = bind_rx("lo", memfd.as_raw_fd(), &[0], Duration::from_secs(2))
            .err()
            .expect("lo cannot bind a DMA-BUF");
        let msg = e.to_string();
        eprintln!("bind-rx on lo: {msg}");
        assert!(
            matches!(
                e,
                NetlinkError::NotSupported { .. }
                    | NetlinkError::BadDmabuf { .. }
                    | NetlinkError::PermissionDenied { .. }
            ),
            "{msg}"
        );
        if !matches!(e, NetlinkError::PermissionDenied { .. }) {
            assert!(msg.contains("lo"), "{msg}");
        }
        assert!(matches!(
            bind_rx("nope-if9", 0, &[0], Duration::from_secs(1)),
            Err(NetlinkError::NoSuchInterface(_))
        ));
    }
}
