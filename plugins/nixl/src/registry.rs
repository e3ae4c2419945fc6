//! Registered memory: local regions (served to peers, checked on every
//! incoming access) and loaded remote region descriptors.

use std::collections::HashMap;
use std::sync::Arc;

use tcpx::{MemoryRegion, Net, PtrKind};

use crate::error::{Error, Result};

/// `nixl_mem_t::DRAM_SEG`.
pub const MEM_DRAM: u32 = 0;
/// `nixl_mem_t::VRAM_SEG`.
pub const MEM_VRAM: u32 = 1;

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

/// A local registration.
pub struct LocalRegion {
    pub addr: u64,
    pub len: u64,
    pub kind: u32,
    pub mr: MemoryRegion,
}

impl LocalRegion {
    /// Offset of `[addr, addr+len)` inside this region, if it lies inside.
    pub fn offset_of(&self, addr: u64, len: u64) -> Option<usize> {
        let end = addr.checked_add(len)?;
        (addr >= self.addr && end <= self.addr + self.len).then(|| (addr - self.addr) as usize)
    }
}

/// A peer's registration, from its public data blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRegion {
    pub agent: String,
    pub addr: u64,
    pub len: u64,
    pub kind: u32,
}

/// Public data of a registration: addr u64, len u64, kind u32 (little-endian).
pub const PUBLIC_LEN: usize = 20;

pub fn encode_public(r: &LocalRegion) -> [u8; PUBLIC_LEN] {
    let mut b = [0; PUBLIC_LEN];
    b[..8].copy_from_slice(&r.addr.to_le_bytes());
    b[8..16].copy_from_slice(&r.len.to_le_bytes());
    b[16..].copy_from_slice(&r.kind.to_le_bytes());
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
    Ok(RemoteRegion {
        agent: agent.to_string(),
        addr: u64_at(0),
        len: u64_at(8),
        kind: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
    })
}

#[derive(Default)]
pub struct Registry {
    local: HashMap<u64, Arc<LocalRegion>>,
    remote: HashMap<u64, RemoteRegion>,
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
        kind: u32,
    ) -> Result<()> {
        if kind != MEM_DRAM {
            return Err(Error::UnsupportedMem(mem_name(kind)));
        }
        if addr.checked_add(len).is_none() {
            return Err(Error::InvalidArgument(format!(
                "region {addr:#x}+{len} wraps"
            )));
        }
        // SAFETY: forwarded to the caller's contract.
        let mr = unsafe { net.reg_mr_raw(addr as *mut u8, len as usize, PtrKind::Host)? };
        self.local.insert(
            id,
            Arc::new(LocalRegion {
                addr,
                len,
                kind,
                mr,
            }),
        );
        Ok(())
    }

    pub fn deregister(&mut self, id: u64) -> Result<()> {
        // Transfers in flight keep their own reference; the region is gone
        // for every later access.
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
    pub fn covering(&self, addr: u64, len: u64, kind: u32) -> Option<(Arc<LocalRegion>, usize)> {
        self.local
            .values()
            .filter(|r| r.kind == kind)
            .find_map(|r| r.offset_of(addr, len).map(|off| (r.clone(), off)))
    }

    pub fn load_remote(&mut self, id: u64, r: RemoteRegion) {
        self.remote.insert(id, r);
    }

    pub fn unload_remote(&mut self, id: u64) -> Result<()> {
        self.remote
            .remove(&id)
            .map(drop)
            .ok_or_else(|| Error::NotFound(format!("remote descriptor {id}")))
    }

    pub fn remote(&self, id: u64) -> Result<RemoteRegion> {
        self.remote
            .get(&id)
            .cloned()
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
        unsafe { reg.register(&net, 1, a, 4096, MEM_DRAM).unwrap() };
        assert_eq!(reg.covering(a, 4096, MEM_DRAM).unwrap().1, 0);
        assert_eq!(reg.covering(a + 100, 10, MEM_DRAM).unwrap().1, 100);
        assert!(reg.covering(a + 1, 4096, MEM_DRAM).is_none());
        assert!(reg.covering(a - 1, 2, MEM_DRAM).is_none());
        assert!(reg.covering(a, 4096, MEM_VRAM).is_none());
        assert!(reg.covering(u64::MAX - 1, 4, MEM_DRAM).is_none());
        reg.deregister(1).unwrap();
        assert!(reg.covering(a, 1, MEM_DRAM).is_none());
        assert!(matches!(reg.deregister(1), Err(Error::NotFound(_))));
    }

    #[test]
    fn vram_is_refused_honestly() {
        let net = net();
        let mut reg = Registry::default();
        // SAFETY: refused before any memory is touched.
        let e = unsafe { reg.register(&net, 1, 4096, 4096, MEM_VRAM) }.unwrap_err();
        assert_eq!(e, Error::UnsupportedMem("VRAM".into()));
        assert!(e.to_string().contains("DRAM only"));
    }

    #[test]
    fn public_data_round_trips() {
        let net = net();
        let mut buf = vec![0u8; 64];
        let mut reg = Registry::default();
        // SAFETY: buf outlives reg.
        unsafe {
            reg.register(&net, 3, buf.as_mut_ptr() as u64, 64, MEM_DRAM)
                .unwrap()
        };
        let l = reg.local(3).unwrap();
        let r = decode_public("B", &encode_public(&l)).unwrap();
        assert_eq!((r.addr, r.len, r.kind), (l.addr, 64, MEM_DRAM));
        assert!(decode_public("B", &[0; 3]).is_err());
    }
}
