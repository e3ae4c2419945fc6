//! Data NICs: resolving names/addresses and their properties.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::IpAddr;

use crate::config::{Config, NicSpec};
use crate::error::{Error, Result};

bitflags::bitflags! {
    /// Memory kinds a device can move; values equal NCCL's `NCCL_PTR_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct PtrKinds: u32 {
        const HOST = 0x1;
        const CUDA = 0x2;
        const DMABUF = 0x4;
    }
}

/// How payload moves on a device, reported once at init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataPath {
    /// Kernel TCP, host memory, copies on both sides.
    Host,
    /// Payload received by the kernel's devmem socket (gpumemd's pool on
    /// TCPX kernels, or a DMA-BUF bound with `bind-rx` upstream).
    Devmem,
    /// Payload received through the emulated devmem NIC (RX pool, fragments, tokens).
    DevmemEmulated,
}

impl fmt::Display for DataPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataPath::Host => "host",
            DataPath::Devmem => "devmem",
            DataPath::DevmemEmulated => "devmem(emulated)",
        })
    }
}

/// One data NIC as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub addr: IpAddr,
    /// Link speed in Mbit/s (10 Gbit/s assumed where the kernel does not say).
    pub speed_mbps: u32,
    pub ptr_kinds: PtrKinds,
    pub max_comms: usize,
    pub path: DataPath,
}

const DEFAULT_SPEED_MBPS: u32 = 10_000;
const MAX_COMMS: usize = 65536;

struct Iface {
    name: String,
    addr: IpAddr,
    up: bool,
    loopback: bool,
}

fn interfaces() -> Result<Vec<Iface>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::io("getifaddrs", e.into()))?;
    let mut out = Vec::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            if v6.ip().is_unicast_link_local() {
                continue; // needs a scope id; NCCL skips these too
            }
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        use nix::net::if_::InterfaceFlags as F;
        out.push(Iface {
            name: a.interface_name,
            addr: ip,
            up: a.flags.contains(F::IFF_UP),
            loopback: a.flags.contains(F::IFF_LOOPBACK),
        });
    }
    Ok(out)
}

fn speed_of(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/speed"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_SPEED_MBPS, |s| s as u32)
}

/// Name and address of one spec. Plain addresses need not belong to an interface
/// name we can find (extra loopback addresses live on `lo`).
pub(crate) fn resolve(spec: &NicSpec) -> Result<(String, IpAddr)> {
    let ifs = interfaces()?;
    match spec {
        NicSpec::Addr(ip) => {
            let name = ifs
                .iter()
                .find(|i| i.addr == *ip)
                .map(|i| i.name.clone())
                .or_else(|| ip.is_loopback().then(|| "lo".to_string()))
                .ok_or_else(|| Error::Interface(ip.to_string()))?;
            Ok((name, *ip))
        }
        NicSpec::Name(n) => ifs
            .iter()
            .filter(|i| &i.name == n)
            .min_by_key(|i| i.addr.is_ipv6()) // prefer IPv4, as NCCL does
            .map(|i| (i.name.clone(), i.addr))
            .ok_or_else(|| Error::Interface(n.clone())),
    }
}

/// The configured data NICs, or every up non-loopback interface, or
/// loopback; their path is `Host` until `path::Paths::decide` says.
pub(crate) fn discover(cfg: &Config) -> Result<Vec<Device>> {
    let picked: Vec<(String, IpAddr)> = if cfg.data_nics.is_empty() {
        let ifs = interfaces()?;
        let mut v: Vec<_> = ifs
            .iter()
            .filter(|i| i.up && !i.loopback && i.addr.is_ipv4())
            .filter(|i| {
                !i.name.starts_with("docker")
                    && !i.name.starts_with("virbr")
                    && !i.name.starts_with("veth")
            })
            .map(|i| (i.name.clone(), i.addr))
            .collect();
        v.dedup_by(|a, b| a.0 == b.0);
        if v.is_empty() {
            v.push(("lo".into(), IpAddr::from([127, 0, 0, 1])));
        }
        v
    } else {
        cfg.data_nics.iter().map(resolve).collect::<Result<_>>()?
    };
    Ok(picked
        .into_iter()
        .map(|(name, addr)| Device {
            speed_mbps: speed_of(&name),
            name,
            addr,
            ptr_kinds: if crate::bounce::cuda_usable() {
                PtrKinds::HOST | PtrKinds::CUDA
            } else {
                PtrKinds::HOST
            },
            max_comms: MAX_COMMS,
            path: DataPath::Host,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_resolve_to_lo() {
        let (name, ip) = resolve(&NicSpec::parse("127.0.0.3").unwrap()).unwrap();
        assert_eq!(name, "lo");
        assert_eq!(ip, IpAddr::from([127, 0, 0, 3]));
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let e = resolve(&NicSpec::Name("nope-no-such-if0".into())).unwrap_err();
        assert!(
            matches!(e, Error::Interface(ref n) if n == "nope-no-such-if0"),
            "{e}"
        );
        assert!(matches!(
            resolve(&NicSpec::parse("192.0.2.77").unwrap()),
            Err(Error::Interface(_))
        ));
    }
}
