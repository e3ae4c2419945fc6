//! Upstream devmem binding over generic netlink (Linux ≥ 6.12 RX, ≥ 6.16 TX):
//! the `netdev` family's `bind-rx` / `bind-tx` operations, built and parsed
//! sans I/O in [`msg`], plus a thin socket layer. The kernel keeps a binding
//! as long as the netlink socket that made it stays open, so [`Binding`]
//! owns it; dropping it unbinds.
//!
//! Constants: include/uapi/linux/netlink.h, genetlink.h, netdev.h (generated
//! from Documentation/netlink/specs/netdev.yaml). The order of the kernel's
//! checks, which [`probe_bind_rx`] relies on, is `net/core/netdev-genl.c`
//! `netdev_nl_bind_rx_doit`: the device, then its queue API ("ops lock"),
//! then its DMA device, then the DMA-BUF fd, then each queue (header split).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;

mod msg;

pub use msg::*;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetlinkError {
    #[error("the kernel has no `netdev` generic-netlink family (devmem RX needs Linux ≥ 6.12, TX ≥ 6.16)")]
    NoFamily,
    #[error("no network interface named {0:?}")]
    NoSuchInterface(String),
    #[error(
        "NIC {ifname} does not support devmem {dir} ({errno}{reason}): {}",
        needs(dir)
    )]
    NotSupported {
        ifname: String,
        dir: &'static str,
        errno: Errno,
        /// The kernel's extended-ack reason, as ": text" (or empty).
        reason: String,
    },
    #[error(
        "binding a DMA-BUF to {ifname}: fd {fd} is not a DMA-BUF the NIC can use ({errno}{reason})"
    )]
    BadDmabuf {
        ifname: String,
        fd: RawFd,
        errno: Errno,
        reason: String,
    },
    #[error("{op} needs CAP_NET_ADMIN (the kernel answered EPERM); run with it or let the host path carry the payload")]
    PermissionDenied { op: &'static str },
    #[error("kernel refused {op}: {errno}{reason}")]
    Kernel {
        op: &'static str,
        errno: Errno,
        reason: String,
    },
    #[error("malformed netlink reply: {0}")]
    Malformed(String),
    #[error("no netlink reply within {0:?}")]
    TimedOut(Duration),
    #[error("netlink socket: {0}")]
    Io(#[from] crate::error::OsError),
}

/// What a NIC needs for devmem in direction `dir`.
fn needs(dir: &str) -> &'static str {
    match dir {
        "TX" => "it needs a driver with netmem TX (upstream Linux >= 6.16)",
        _ => "it needs header split, flow steering and the queue API (upstream devmem TCP drivers)",
    }
}

impl From<std::io::Error> for NetlinkError {
    fn from(e: std::io::Error) -> Self {
        NetlinkError::Io(e.into())
    }
}

/// `SOL_NETLINK`, `NETLINK_CAP_ACK`, `NETLINK_EXT_ACK` (netlink.h).
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;

fn set_int(fd: &OwnedFd, level: i32, opt: i32, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a valid fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
        // The kernel's reasons in errors, without the request echoed back;
        // older kernels lack them and answer with the errno alone.
        let _ = set_int(&fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = set_int(&fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);
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
                Reply::Error { errno, .. } if -*errno == libc::ENOENT => return Ok(None),
                Reply::Error { errno, msg } => {
                    return Err(NetlinkError::Kernel {
                        op: "CTRL_CMD_GETFAMILY",
                        errno: Errno::from_raw(-errno),
                        reason: reason(msg),
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

fn reason(msg: &Option<String>) -> String {
    msg.as_ref().map_or(String::new(), |m| format!(": {m}"))
}

/// A DMA-BUF bound to a NIC; the kernel unbinds it when this is dropped
/// (its netlink socket closes).
pub struct Binding {
    _socket: GenlSocket,
    /// The binding id the kernel reports in devmem cmsgs (`dmabuf_id`) and
    /// that TX cmsgs name.
    pub dmabuf_id: u32,
}

impl std::fmt::Debug for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Binding(id {})", self.dmabuf_id)
    }
}

/// What to bind: RX queues, or TX.
#[derive(Clone, Copy)]
enum Dir<'a> {
    Rx(&'a [u32]),
    Tx,
}

/// The kernel's answer to one bind request, classified.
fn bind_call(
    ifname: &str,
    dmabuf_fd: RawFd,
    dir: Dir<'_>,
    deadline: Duration,
) -> Result<(GenlSocket, Option<u32>), NetlinkError> {
    let ifindex = nix::net::if_::if_nametoindex(ifname)
        .map_err(|_| NetlinkError::NoSuchInterface(ifname.to_string()))?;
    let mut s = GenlSocket::open(deadline)?;
    let family = s
        .family_id(NETDEV_FAMILY_NAME)?
        .ok_or(NetlinkError::NoFamily)?;
    let (op, name) = match dir {
        Dir::Rx(_) => ("netdev bind-rx", "RX"),
        Dir::Tx => ("netdev bind-tx", "TX"),
    };
    let replies = s.call(|seq| match dir {
        Dir::Rx(q) => bind_rx_request(seq, family, ifindex, dmabuf_fd, q),
        Dir::Tx => bind_tx_request(seq, family, ifindex, dmabuf_fd),
    })?;
    let mut id = None;
    for r in &replies {
        match r {
            Reply::Error { errno, msg } => {
                let errno = Errno::from_raw(-errno);
                let reason = reason(msg);
                return Err(match errno {
                    Errno::EPERM => NetlinkError::PermissionDenied { op },
                    Errno::EBADF => NetlinkError::BadDmabuf {
                        ifname: ifname.to_string(),
                        fd: dmabuf_fd,
                        errno,
                        reason,
                    },
                    _ => NetlinkError::NotSupported {
                        ifname: ifname.to_string(),
                        dir: name,
                        errno,
                        reason,
                    },
                });
            }
            Reply::Genl(attrs) => id = attr_u32(attrs, NETDEV_A_DMABUF_ID).or(id),
            Reply::Ack => {}
        }
    }
    Ok((s, id))
}

fn bind(
    ifname: &str,
    dmabuf_fd: RawFd,
    dir: Dir<'_>,
    deadline: Duration,
) -> Result<Binding, NetlinkError> {
    let (socket, id) = bind_call(ifname, dmabuf_fd, dir, deadline)?;
    Ok(Binding {
        _socket: socket,
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
    bind(ifname, dmabuf_fd, Dir::Rx(queues), deadline)
}

/// Binds `dmabuf_fd` for devmem TX on `ifname` (Linux ≥ 6.16).
pub fn bind_tx(
    ifname: &str,
    dmabuf_fd: RawFd,
    deadline: Duration,
) -> Result<Binding, NetlinkError> {
    bind(ifname, dmabuf_fd, Dir::Tx, deadline)
}

/// Asks whether `ifname` could take a `bind-rx` (or, `queues = None`,
/// a `bind-tx`) without any device memory: the request names no DMA-BUF
/// (fd -1), which the kernel checks only after the NIC, so `EBADF` means
/// the NIC passed (its queue API, its DMA device) and anything else is
/// the NIC's or the caller's refusal, typed. Header split is checked per
/// queue, after the DMA-BUF: only a real bind finds a NIC without it.
pub fn probe_bind(
    ifname: &str,
    queues: Option<&[u32]>,
    deadline: Duration,
) -> Result<(), NetlinkError> {
    let dir = queues.map_or(Dir::Tx, Dir::Rx);
    match bind_call(ifname, -1, dir, deadline) {
        Err(NetlinkError::BadDmabuf { .. }) => Ok(()),
        Err(e) => Err(e),
        // Nothing can be bound to fd -1; an acknowledgement is the kernel
        // not checking, which a real bind will find out.
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netdev_family_here() -> bool {
        let mut s = match GenlSocket::open(Duration::from_secs(2)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipped: no generic netlink socket here ({e})");
                return false;
            }
        };
        match s.family_id(NETDEV_FAMILY_NAME) {
            Ok(Some(_)) => true,
            Ok(None) => {
                eprintln!("skipped: kernel without the netdev family");
                false
            }
            Err(e) => panic!("family lookup failed: {e}"),
        }
    }

    #[test]
    fn binding_lo_is_a_clear_error_naming_it() {
        if !netdev_family_here() {
            return;
        }
        let memfd = nix::sys::memfd::memfd_create(
            c"tcpx-not-a-dmabuf",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .unwrap();
        for tx in [false, true] {
            let r = if tx {
                bind_tx("lo", memfd.as_raw_fd(), Duration::from_secs(2))
            } else {
                bind_rx("lo", memfd.as_raw_fd(), &[0], Duration::from_secs(2))
            };
            let e = r.expect_err("lo cannot bind a DMA-BUF");
            let msg = e.to_string();
            eprintln!("bind-{} on lo: {msg}", if tx { "tx" } else { "rx" });
            // As root: lo has no queue API (RX) and no netmem TX: EOPNOTSUPP.
            match e {
                NetlinkError::NotSupported { errno, .. } => {
                    assert_eq!(errno, Errno::EOPNOTSUPP, "{msg}");
                    assert!(msg.contains("lo"), "{msg}");
                    let needs = if tx { "netmem TX" } else { "queue API" };
                    assert!(msg.contains(needs), "{msg}");
                }
                NetlinkError::PermissionDenied { .. } => {}
                other => panic!("unexpected answer: {other}"),
            }
        }
        assert!(matches!(
            bind_rx("nope-if9", 0, &[0], Duration::from_secs(1)),
            Err(NetlinkError::NoSuchInterface(_))
        ));
    }

    #[test]
    fn probing_lo_finds_it_unsupported_without_device_memory() {
        if !netdev_family_here() {
            return;
        }
        for queues in [Some(&[0u32][..]), None] {
            match probe_bind("lo", queues, Duration::from_secs(2)) {
                Err(NetlinkError::NotSupported { errno, .. }) => {
                    assert_eq!(errno, Errno::EOPNOTSUPP)
                }
                Err(NetlinkError::PermissionDenied { .. }) => {}
                other => panic!("lo passed the probe: {other:?}"),
            }
        }
    }
}
