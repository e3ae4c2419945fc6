//! The emulated NIC's TX side: memory that devmem sends read from.
//!
//! A real kernel resolves the devmem TX cmsg to a DMA-BUF: TCPX kernels by
//! the fd the cmsg names, upstream kernels by the id `bind-tx` returned. The
//! emulator keeps its own table: [`EmuTxBinding::bind`] registers a
//! [`TxMemory`] under an id that stands in for either, and sends through
//! an emulated socket read the bytes from it (host memory directly, GPU
//! memory by a device-to-host copy), which is the emulator's one extra copy.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::sockabi::{KernelAbi, TxTarget};

/// Memory an emulated devmem send reads, as a NIC reads a DMA-BUF.
pub trait TxMemory: Send + Sync {
    /// Bytes the memory spans.
    fn len(&self) -> usize;
    /// Whether it spans none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `out.len()` bytes from `offset` into `out`.
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
}

type Table = Mutex<HashMap<u32, Arc<dyn TxMemory>>>;

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(Default::default)
}

/// Ids start high so that one is never mistaken for a small real fd.
static NEXT_ID: AtomicU32 = AtomicU32::new(1 << 20);

/// Memory registered with the emulated NIC for devmem sends; unregistered
/// when dropped.
#[derive(Debug)]
pub struct EmuTxBinding {
    id: u32,
}

impl EmuTxBinding {
    /// Registers `memory` (the emulated `bind-tx`, or the TCPX kernel's
    /// DMA-BUF import).
    pub fn bind(memory: Arc<dyn TxMemory>) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        lock().insert(id, memory);
        EmuTxBinding { id }
    }

    /// The id: the upstream binding id, or the TCPX "DMA-BUF fd".
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The devmem TX target of `abi` for bytes at `offset`, and the iov base
    /// that goes with it (upstream: the offset; TCPX: none, the caller's
    /// host buffer). `None` when a TCPX offset does not fit its 32 bits.
    pub fn target(&self, abi: KernelAbi, offset: u64) -> Option<(TxTarget, Option<u64>)> {
        match abi {
            KernelAbi::Tcpx => Some((
                TxTarget::Tcpx {
                    dmabuf_fd: self.id as i32,
                    offset: i32::try_from(offset).ok()?,
                },
                None,
            )),
            KernelAbi::Upstream => Some((
                TxTarget::Upstream {
                    binding_id: self.id,
                },
                Some(offset),
            )),
        }
    }
}

impl Drop for EmuTxBinding {
    fn drop(&mut self) {
        lock().remove(&self.id);
    }
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<u32, Arc<dyn TxMemory>>> {
    table().lock().unwrap_or_else(|p| p.into_inner())
}

/// The memory bound under `id`, as the kernel looks a binding up.
pub(super) fn lookup(id: u32) -> Option<Arc<dyn TxMemory>> {
    lock().get(&id).cloned()
}

/// Host bytes as TX memory (tests, and the emulator's own checks).
impl TxMemory for Vec<u8> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| efault())?;
        let src = start
            .checked_add(out.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(efault)?;
        out.copy_from_slice(src);
        Ok(())
    }
}

/// What the kernel answers for a devmem send outside its DMA-BUF.
pub(super) fn efault() -> io::Error {
    io::Error::from_raw_os_error(libc::EFAULT)
}
