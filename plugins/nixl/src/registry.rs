//! Registered memory: local regions (served to peers, checked on every
//! incoming access) and loaded remote region descriptors.

use std::collections::HashMap;
use std::sync::Arc;

use tcpx::{MemoryRegion, Net, PtrKind};

use crate::error::{Error, Result};

/// A memory kind this backend moves, numbered as `nixl_mem_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    /// `DRAM_SEG`: host memory.
    Dram,
    /// `VRAM_SEG`: CUDA device memory, moved through tcpx's pinned bounce path.
    Vram,
}

impl Mem {
    /// Every kind, in `nixl_mem_t` order.
    pub const ALL: [Mem; 2] = [Mem::Dram, Mem::Vram];

    /// The kind of a `nixl_mem_t` value; kinds we never move are refused.
    pub fn from_nixl(kind: u32) -> Result<Mem> {
        match kind {
            0 => Ok(Mem::Dram),
            1 => Ok(Mem::Vram),
            k => Err(Error::UnsupportedMem(mem_name(k))),
        }
    }

    pub fn nixl(self) -> u32 {
        match self {
            Mem::Dram => 0,
            Mem::Vram => 1,
        }
    }

    /// `Ok` when memory of this kind can be registered in this process; the
    /// error names the cause (CUDA is probed once, by devmem).
    pub fn usable(self) -> Result<()> {
        match self {
            Mem::Dram => Ok(()),
            Mem::Vram => devmem::cuda::probe()
                .map(drop)
                .map_err(|e| Error::NoCuda(e.to_string())),
        }
    }

    /// The kinds `usable` accepts: what getSupportedMems reports.
    pub fn supported() -> Vec<Mem> {
        Mem::ALL
            .into_iter()
            .filter(|m| m.usable().is_ok())
            .collect()
    }
}

impl std::fmt::Display for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&mem_name(self.nixl()))
    }
}

pub fn mem_name(kind: u32) -> String {
    match kind {
        0 => "DRAM".into(),
        1 => "VRAM".into(),
        2 => "BLK".into(),
        3 => "OBJ".into(),
        4 => "FILE".into(),
        k => format!("memory kind {k}"),
    }
}

/// tcpx registers CUDA memory only at 4 KiB-aligned addresses (the TCPX
/// plugin's rule); NIXL users register arbitrary tensors, so a VRAM region
/// is registered from the 4 KiB boundary below it and addressed by offset.
const VRAM_ALIGN: u64 = 4096;

/// A local registration.
pub struct LocalRegion {
    pub addr: u64,
    pub len: u64,
    pub kind: Mem,
    pub mr: MemoryRegion,
    /// The GPU of a VRAM registration.
    pub gpu: Option<i32>,
    /// Where `addr` lies inside `mr` (nonzero only for VRAM rounded down).
    shift: u64,
}

impl LocalRegion {
    /// Offset inside `mr` of `[addr, addr+len)`, if the range lies inside
    /// this registration.
    pub fn offset_of(&self, addr: u64, len: u64) -> Option<usize> {
        let end = addr.checked_add(len)?;
        (addr >= self.addr && end <= self.addr + self.len)
            .then(|| (addr - self.addr + self.shift) as usize)
    }

    /// The address of `[off, off+len)` of `mr`, checked to lie inside it.
    fn addr_of(&self, off: usize, len: usize) -> Result<u64> {
        let end = off.checked_add(len);
        if end.is_none_or(|e| e > self.mr.len()) {
            return Err(Error::InvalidArgument(format!(
                "bytes {off}+{len} outside a {}-byte registration",
                self.mr.len()
            )));
        }
        Ok(self.addr - self.shift + off as u64)
    }

    /// Host pointer to `[off, off+len)` of a DRAM registration's `mr`.
    pub fn host_bytes(&self, off: usize, len: usize) -> Result<*mut u8> {
        match self.kind {
            Mem::Dram => Ok(self.addr_of(off, len)? as *mut u8),
            Mem::Vram => Err(Error::InvalidArgument("VRAM has no host address".into())),
        }
    }

    /// Device address of `[off, off+len)` of a VRAM registration's `mr`.
    pub fn device_addr(&self, off: usize, len: usize) -> Result<u64> {
        match self.kind {
            Mem::Vram => self.addr_of(off, len),
            Mem::Dram => Err(Error::InvalidArgument("DRAM has no device address".into())),
        }
    }
}

/// A peer's registration, from its public data blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRegion {
    pub agent: String,
    pub addr: u64,
    pub len: u64,
    pub kind: Mem,
}

/// Public data of a registration: addr u64, len u64, kind u32 (little-endian).
pub const PUBLIC_LEN: usize = 20;

pub fn encode_public(r: &LocalRegion) -> [u8; PUBLIC_LEN] {
    let mut b = [0; PUBLIC_LEN];
    b[..8].copy_from_slice(&r.addr.to_le_bytes());
    b[8..16].copy_from_slice(&r.len.to_le_bytes());
    b[16..].copy_from_slice(&r.kind.nixl().to_le_bytes());
    b
}

pub fn decode_public(agent: &str, b: &[u8]) -> Result<RemoteRegion> {
    if b.len() != PUBLIC_LEN {
        return Err(Error::InvalidArgument(format!(
            "remote region descriptor of {} bytes, expected {PUBLIC_LEN}; is {agent:?} running the same TCPX plugin?",
            b.len()
        )));
    }
    let u64_at = |i: usize| {
        let mut a = [0; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let kind = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    Ok(RemoteRegion {
        agent: agent.to_string(),
        addr: u64_at(0),
        len: u64_at(8),
        kind: Mem::from_nixl(kind).map_err(|_| {
            Error::Protocol(format!(
                "{agent:?} describes a region of {}, which TCPX never registers",
                mem_name(kind)
            ))
        })?,
    })
}

#[derive(Default)]
pub struct Registry {
    local: HashMap<u64, Arc<LocalRegion>>,
    remote: HashMap<u64, RemoteRegion>,
    /// Counts removals: what was resolved under an equal count is still valid.
    generation: u64,
}

impl Registry {
    /// Registers caller-owned memory.
    ///
    /// # Safety
    /// `addr..addr+len` must stay valid until `deregister(id)` and until every
    /// transfer using it has completed (NIXL's contract for registered memory).
    pub unsafe fn register(
        &mut self,
        net: &Net,
        id: u64,
        addr: u64,
        len: u64,
        kind: Mem,
    ) -> Result<()> {
        kind.usable()?;
        if addr.checked_add(len).is_none() {
            return Err(Error::InvalidArgument(format!(
                "region {addr:#x}+{len} wraps"
            )));
        }
        let (base, ptr_kind) = match kind {
            Mem::Dram => (addr, PtrKind::Host),
            Mem::Vram => (addr & !(VRAM_ALIGN - 1), PtrKind::Cuda),
        };
        let shift = addr - base;
        // SAFETY: forwarded to the caller's contract; the bytes below `addr`
        // that VRAM rounding adds are never read or written (offset_of
        // hands out offsets of the caller's range only).
        let mr = unsafe { net.reg_mr_raw(base as *mut u8, (len + shift) as usize, ptr_kind) }
            .map_err(|e| match e {
                tcpx::Error::InvalidArgument(m) if shift > 0 => Error::InvalidArgument(format!(
                    "VRAM region {addr:#x}+{len} is registered from its 4 KiB page at {base:#x}: {m}"
                )),
                e => e.into(),
            })?;
        self.local.insert(
            id,
            Arc::new(LocalRegion {
                addr,
                len,
                kind,
                gpu: mr.cuda_ordinal(),
                mr,
                shift,
            }),
        );
        Ok(())
    }

    pub fn deregister(&mut self, id: u64) -> Result<()> {
        // Transfers in flight keep their own reference; the region is gone
        // for every later access.
        self.generation += 1;
        self.local
            .remove(&id)
            .map(drop)
            .ok_or_else(|| Error::NotFound(format!("local registration {id}")))
    }

    pub fn local(&self, id: u64) -> Result<Arc<LocalRegion>> {
        self.local
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("local registration {id}")))
    }

    /// The registration covering `[addr, addr+len)` with memory kind `kind`:
    /// the check every incoming access must pass.
    pub fn covering(&self, addr: u64, len: u64, kind: Mem) -> Option<(Arc<LocalRegion>, usize)> {
        self.local
            .values()
            .filter(|r| r.kind == kind)
            .find_map(|r| r.offset_of(addr, len).map(|off| (r.clone(), off)))
    }

    pub fn load_remote(&mut self, id: u64, r: RemoteRegion) {
        self.remote.insert(id, r);
    }

    pub fn unload_remote(&mut self, id: u64) -> Result<()> {
        self.generation += 1;
        self.remote
            .remove(&id)
            .map(drop)
            .ok_or_else(|| Error::NotFound(format!("remote descriptor {id}")))
    }

    /// Changes whenever a registration or remote descriptor goes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn remote(&self, id: u64) -> Result<&RemoteRegion> {
        self.remote
            .get(&id)
            .ok_or_else(|| Error::NotFound(format!("remote descriptor {id}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Net {
        Net::init(tcpx::Config::loopback(&["127.0.0.1"]).unwrap()).unwrap()
    }

    #[test]
    fn accesses_outside_registrations_find_nothing() {
        let net = net();
        let mut buf = vec![0u8; 4096];
        let a = buf.as_mut_ptr() as u64;
        let mut reg = Registry::default();
        // SAFETY: buf outlives reg.
        unsafe { reg.register(&net, 1, a, 4096, Mem::Dram).unwrap() };
        assert_eq!(reg.covering(a, 4096, Mem::Dram).unwrap().1, 0);
        assert_eq!(reg.covering(a + 100, 10, Mem::Dram).unwrap().1, 100);
        assert!(reg.covering(a + 1, 4096, Mem::Dram).is_none());
        assert!(reg.covering(a - 1, 2, Mem::Dram).is_none());
        // A VRAM access never matches a DRAM registration.
        assert!(reg.covering(a, 4096, Mem::Vram).is_none());
        assert!(reg.covering(u64::MAX - 1, 4, Mem::Dram).is_none());
        reg.deregister(1).unwrap();
        assert!(reg.covering(a, 1, Mem::Dram).is_none());
        assert!(matches!(reg.deregister(1), Err(Error::NotFound(_))));
    }

    #[test]
    fn memory_kinds_are_typed() {
        assert_eq!(Mem::from_nixl(0), Ok(Mem::Dram));
        assert_eq!(Mem::from_nixl(1), Ok(Mem::Vram));
        assert_eq!(Mem::from_nixl(4), Err(Error::UnsupportedMem("FILE".into())));
        assert!(Mem::ALL.iter().all(|m| Mem::from_nixl(m.nixl()) == Ok(*m)));
        assert_eq!(Mem::supported()[0], Mem::Dram);
    }

    #[test]
    fn vram_is_refused_with_the_cause() {
        let net = net();
        let mut reg = Registry::default();
        // An aligned address that is not GPU memory: refused either way,
        // before anything touches it.
        // SAFETY: refused before any memory is touched.
        let e = unsafe { reg.register(&net, 1, 1 << 20, 4096, Mem::Vram) }.unwrap_err();
        match devmem::cuda::probe() {
            Err(why) => {
                assert_eq!(e, Error::NoCuda(why.to_string()));
                assert_eq!(Mem::supported(), vec![Mem::Dram]);
                assert!(e.to_string().contains("VRAM needs CUDA"), "{e}");
            }
            Ok(_) => {
                assert!(e.to_string().contains("not GPU memory"), "{e}");
                assert_eq!(Mem::supported(), Mem::ALL.to_vec());
            }
        }
        assert!(reg.covering(1 << 20, 1, Mem::Vram).is_none());
    }

    #[test]
    fn public_data_round_trips() {
        let net = net();
        let mut buf = vec![0u8; 64];
        let mut reg = Registry::default();
        // SAFETY: buf outlives reg.
        unsafe {
            reg.register(&net, 3, buf.as_mut_ptr() as u64, 64, Mem::Dram)
                .unwrap()
        };
        let l = reg.local(3).unwrap();
        let r = decode_public("B", &encode_public(&l)).unwrap();
        assert_eq!((r.addr, r.len, r.kind), (l.addr, 64, Mem::Dram));
        assert!(decode_public("B", &[0; 3]).is_err());
        let mut blob = encode_public(&l);
        blob[16] = 4;
        assert!(matches!(decode_public("B", &blob), Err(Error::Protocol(_))));
    }

    proptest::proptest! {
        #[test]
        fn public_data_parses_any_bytes_without_panicking(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)
        ) {
            let kind = (b.len() == PUBLIC_LEN)
                .then(|| u32::from_le_bytes([b[16], b[17], b[18], b[19]]));
            match decode_public("B", &b) {
                Ok(r) => {
                    proptest::prop_assert_eq!(Some(r.kind.nixl()), kind);
                    proptest::prop_assert_eq!(&r.addr.to_le_bytes()[..], &b[..8]);
                    proptest::prop_assert_eq!(&r.len.to_le_bytes()[..], &b[8..16]);
                }
                Err(_) => proptest::prop_assert!(kind.is_none_or(|k| k > 1)),
            }
        }
    }
}
