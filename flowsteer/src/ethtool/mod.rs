//! The ethtool ntuple backend: `SIOCETHTOOL` with `ETHTOOL_SRXCLSRLINS` /
//! `ETHTOOL_SRXCLSRLDEL`, as `ethtool -N <if> flow-type tcp4 ... action <q>` does.

pub mod sys;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::{FlowTuple, Rule, RuleHandle, RuleId, SteerError, Steering};
use sys::{ethtool_ioctl, ifr_name, EthtoolFlowUnion, EthtoolRxFlowSpec, EthtoolRxnfc, IFNAMSIZ};

/// Installs ntuple rules on one NIC through the ethtool ioctl.
///
/// The control socket is made in [`EthtoolSteering::new`], so the NIC is
/// looked up in the network namespace current at that time.
#[derive(Debug, Clone)]
pub struct EthtoolSteering {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ifname: String,
    name: [libc::c_char; IFNAMSIZ],
    sock: OwnedFd,
}

/// What `ETHTOOL_GRXCLSRLCNT` says about a NIC's rule table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleTable {
    /// Rules installed now.
    pub rules: u32,
    /// Table size (0 if the driver does not say).
    pub size: u32,
    /// Whether the driver picks locations itself (`RX_CLS_LOC_ANY`).
    pub special_locations: bool,
}

impl EthtoolSteering {
    /// A backend for interface `ifname` (no kernel call besides `socket`).
    pub fn new(ifname: &str) -> Result<Self, SteerError> {
        let name = ifr_name(ifname).ok_or_else(|| SteerError::InvalidInterfaceName {
            ifname: ifname.to_owned(),
        })?;
        // SAFETY: plain socket(2) call, no pointers.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(SteerError::Io {
                ifname: ifname.to_owned(),
                op: "socket(AF_INET, SOCK_DGRAM) for SIOCETHTOOL",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EthtoolSteering {
            inner: Arc::new(Inner {
                ifname: ifname.to_owned(),
                name,
                sock,
            }),
        })
    }

    /// The interface this backend steers on.
    pub fn ifname(&self) -> &str {
        &self.inner.ifname
    }

    fn call(&self, op: &'static str, nfc: &mut EthtoolRxnfc) -> Result<(), SteerError> {
        ethtool_ioctl(self.inner.sock.as_fd(), self.inner.name, nfc)
            .map_err(|e| map_err(&self.inner.ifname, op, e))
    }

    /// Rule count and table size (`ETHTOOL_GRXCLSRLCNT`).
    pub fn rule_table(&self) -> Result<RuleTable, SteerError> {
        let mut nfc = EthtoolRxnfc {
            cmd: sys::ETHTOOL_GRXCLSRLCNT,
            ..Default::default()
        };
        self.call("ETHTOOL_GRXCLSRLCNT", &mut nfc)?;
        Ok(RuleTable {
            rules: nfc.rule_cnt,
            size: (nfc.data as u32) & !sys::RX_CLS_LOC_SPECIAL,
            special_locations: (nfc.data as u32) & sys::RX_CLS_LOC_SPECIAL != 0,
        })
    }

    fn insert(&self, tuple: &FlowTuple, queue: u32, location: u32) -> Result<u32, SteerError> {
        let mut nfc = EthtoolRxnfc {
            cmd: sys::ETHTOOL_SRXCLSRLINS,
            fs: flow_spec(tuple, queue)?,
            ..Default::default()
        };
        nfc.fs.location = location;
        self.call("ETHTOOL_SRXCLSRLINS", &mut nfc)?;
        // The kernel writes back the location it chose.
        Ok(nfc.fs.location)
    }
}

/// The rule for `tuple`: every address and port bit matched.
pub fn flow_spec(tuple: &FlowTuple, queue: u32) -> Result<EthtoolRxFlowSpec, SteerError> {
    let (sp, dp) = (tuple.src.port(), tuple.dst.port());
    let (flow_type, h_u, m_u) = match (tuple.src, tuple.dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => (
            sys::TCP_V4_FLOW,
            EthtoolFlowUnion::tcp_ip4(s.ip().octets(), d.ip().octets(), sp, dp, 0),
            EthtoolFlowUnion::tcp_ip4([0xff; 4], [0xff; 4], 0xffff, 0xffff, 0),
        ),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => (
            sys::TCP_V6_FLOW,
            EthtoolFlowUnion::tcp_ip6(s.ip().octets(), d.ip().octets(), sp, dp, 0),
            EthtoolFlowUnion::tcp_ip6([0xff; 16], [0xff; 16], 0xffff, 0xffff, 0),
        ),
        _ => {
            return Err(SteerError::InvalidTuple {
                tuple: tuple.to_string(),
                reason: "source and destination are of different address families",
            })
        }
    };
    Ok(EthtoolRxFlowSpec {
        flow_type,
        h_u,
        m_u,
        ring_cookie: u64::from(queue),
        location: sys::RX_CLS_LOC_ANY,
        ..Default::default()
    })
}

fn map_err(ifname: &str, op: &'static str, e: io::Error) -> SteerError {
    let ifname = ifname.to_owned();
    match e.raw_os_error() {
        Some(libc::ENODEV) => SteerError::NoSuchInterface { ifname },
        Some(libc::EOPNOTSUPP) => SteerError::NotSupported { ifname },
        Some(libc::EPERM) | Some(libc::EACCES) => SteerError::PermissionDenied { ifname },
        _ => SteerError::Io {
            ifname,
            op,
            source: e,
        },
    }
}

impl Steering for EthtoolSteering {
    fn install(&self, tuple: FlowTuple, queue: u32) -> Result<RuleHandle, SteerError> {
        let location = match self.insert(&tuple, queue, sys::RX_CLS_LOC_ANY) {
            Ok(loc) => loc,
            // Drivers without special locations refuse RX_CLS_LOC_ANY with
            // EINVAL; then pick the lowest free slot ourselves, as ethtool does.
            Err(SteerError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                let loc = self.free_location()?;
                self.insert(&tuple, queue, loc)?
            }
            Err(e) => return Err(e),
        };
        let rule = Rule {
            tuple,
            queue,
            id: RuleId(u64::from(location)),
        };
        tracing::debug!(ifname = %self.inner.ifname, %tuple, queue, location, "installed ntuple rule");
        Ok(RuleHandle::new(rule, Arc::new(self.clone())))
    }

    fn remove(&self, rule: &Rule) -> Result<(), SteerError> {
        let mut nfc = EthtoolRxnfc {
            cmd: sys::ETHTOOL_SRXCLSRLDEL,
            ..Default::default()
        };
        nfc.fs.location = u32::try_from(rule.id.0).map_err(|_| SteerError::InvalidTuple {
            tuple: rule.tuple.to_string(),
            reason: "rule id is not an ethtool location",
        })?;
        self.call("ETHTOOL_SRXCLSRLDEL", &mut nfc)
    }
}

impl EthtoolSteering {
    /// Lowest location not in use (`ETHTOOL_GRXCLSRLALL`).
    fn free_location(&self) -> Result<u32, SteerError> {
        let table = self.rule_table()?;
        let mut all = Box::new(sys::EthtoolRxnfcLocs::default());
        all.cmd = sys::ETHTOOL_GRXCLSRLALL;
        all.rule_cnt = table.rules.min(sys::MAX_RULE_LOCS as u32);
        ethtool_ioctl(self.inner.sock.as_fd(), self.inner.name, &mut *all)
            .map_err(|e| map_err(&self.inner.ifname, "ETHTOOL_GRXCLSRLALL", e))?;
        let used = &all.rule_locs[..(all.rule_cnt as usize).min(sys::MAX_RULE_LOCS)];
        let size = if all.data == 0 {
            u64::from(u32::MAX)
        } else {
            all.data
        };
        (0..size)
            .filter_map(|l| u32::try_from(l).ok())
            .find(|l| !used.contains(l))
            .ok_or_else(|| SteerError::Io {
                ifname: self.inner.ifname.clone(),
                op: "finding a free ntuple rule location",
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_spec_matches_every_bit() {
        let t = FlowTuple {
            src: "192.168.1.2:40000".parse().unwrap(),
            dst: "192.168.1.3:5201".parse().unwrap(),
        };
        let fs = flow_spec(&t, 7).unwrap();
        assert_eq!(fs.flow_type, sys::TCP_V4_FLOW);
        assert_eq!(fs.ring_cookie, 7);
        assert_eq!(fs.location, sys::RX_CLS_LOC_ANY);
        assert_eq!(
            &fs.h_u.hdata[..12],
            &[192, 168, 1, 2, 192, 168, 1, 3, 0x9c, 0x40, 0x14, 0x51]
        );
        assert_eq!(
            &fs.m_u.hdata[..13],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]
        );
        assert_eq!(fs.h_ext, Default::default());
    }

    #[test]
    fn v6_spec_and_mixed_families() {
        let t = FlowTuple {
            src: "[fe80::1]:1".parse().unwrap(),
            dst: "[fe80::2]:2".parse().unwrap(),
        };
        let fs = flow_spec(&t, 0).unwrap();
        assert_eq!(fs.flow_type, sys::TCP_V6_FLOW);
        assert_eq!(fs.h_u.hdata[0..2], [0xfe, 0x80]);
        assert_eq!(fs.h_u.hdata[31], 2);
        assert_eq!(fs.h_u.hdata[32..36], [0, 1, 0, 2]);
        let bad = FlowTuple {
            src: "[fe80::1]:1".parse().unwrap(),
            dst: "1.2.3.4:2".parse().unwrap(),
        };
        assert!(matches!(
            flow_spec(&bad, 0),
            Err(SteerError::InvalidTuple { .. })
        ));
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["", "waytoolonginterfacename", "a\0"] {
            assert!(matches!(
                EthtoolSteering::new(n),
                Err(SteerError::InvalidInterfaceName { .. })
            ));
        }
    }

    #[test]
    fn missing_interface_is_typed() {
        let s = EthtoolSteering::new("tcpxnosuch0").unwrap();
        let t = FlowTuple {
            src: "127.0.0.1:1".parse().unwrap(),
            dst: "127.0.0.1:2".parse().unwrap(),
        };
        let err = s.install(t, 0).unwrap_err();
        assert!(
            matches!(err, SteerError::NoSuchInterface { ref ifname } if ifname == "tcpxnosuch0"),
            "{err}"
        );
    }

    #[test]
    fn loopback_has_no_ntuple_filters() {
        let s = EthtoolSteering::new("lo").unwrap();
        let t = FlowTuple {
            src: "127.0.0.1:1".parse().unwrap(),
            dst: "127.0.0.1:2".parse().unwrap(),
        };
        let err = s.install(t, 0).unwrap_err();
        // SIOCETHTOOL set commands check CAP_NET_ADMIN before the driver.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(matches!(err, SteerError::NotSupported { .. }), "{err}");
            assert_eq!(
                err.to_string(),
                "NIC lo does not support ntuple filters (ethtool -K lo ntuple on)"
            );
        } else {
            assert!(matches!(err, SteerError::PermissionDenied { .. }), "{err}");
        }
    }
}
