//! How a registered region is named to the devmem TX NICs, made at
//! registration: per NIC, the upstream TX binding of the region's DMA-BUF
//! (`bind-tx`), the TCPX kernel's TX-pages fd of it (`DMA_BUF_CREATE_PAGES`
//! with the NIC's PCI address), or the emulated NIC's binding of the
//! region's memory. A NIC where none could be made sends the region by the
//! bounce path (one log line per region and NIC).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use devmem::cuda::mem::{read_rows, DeviceSpan};
use devmem::cuda::unpack::Frag;
use devmem::cuda::Context;
use devmem::emu::{EmuTxBinding, TxMemory};
use devmem::netlink::{self, Binding};
use devmem::sockabi::{KernelAbi, TxTarget};

use crate::config::Config;
use crate::memory::{MemoryRegion, PtrKind};
use crate::path::Paths;

/// A region as one devmem TX NIC knows it.
pub(crate) enum RegionTx {
    /// The emulated NIC's binding (one per region, for every NIC).
    Emulated(Arc<EmuTxBinding>),
    /// The upstream kernel's TX binding on this NIC.
    Upstream(Binding),
    /// The TCPX kernel's TX-pages fd for this NIC.
    Tcpx(OwnedFd),
}

impl RegionTx {
    /// The TX cmsg target for the region's bytes at `off`, and the iov base
    /// that goes with it (`None`: a host buffer of the send's length).
    pub fn target(&self, abi: KernelAbi, off: u64) -> Option<(TxTarget, Option<u64>)> {
        match self {
            RegionTx::Emulated(b) => b.target(abi, off),
            RegionTx::Upstream(b) => Some((
                TxTarget::Upstream {
                    binding_id: b.dmabuf_id,
                },
                Some(off),
            )),
            RegionTx::Tcpx(fd) => Some((
                TxTarget::Tcpx {
                    dmabuf_fd: fd.as_raw_fd(),
                    offset: i32::try_from(off).ok()?,
                },
                None,
            )),
        }
    }
}

/// How long the kernel may take to answer `bind-tx`.
const NETLINK_DEADLINE: Duration = Duration::from_secs(2);

/// Makes the region's TX names for every devmem TX NIC of `paths`.
pub(crate) fn attach(paths: &Paths, cfg: &Config, mr: &mut MemoryRegion) {
    let kind = mr.kind();
    if !paths.nics.iter().any(|n| n.tx.is_some())
        || (kind == PtrKind::Host && !cfg.emu_tx_host)
        || mr.is_empty()
    {
        return;
    }
    let mut emulated: Option<Arc<EmuTxBinding>> = None;
    let mut names = Vec::with_capacity(paths.nics.len());
    for n in &paths.nics {
        let name = match n.tx {
            None => None,
            Some(t) if t.emulated => {
                if emulated.is_none() {
                    emulated = memory_of(mr).map(|m| Arc::new(EmuTxBinding::bind(m)));
                }
                emulated.clone().map(RegionTx::Emulated)
            }
            Some(t) => {
                let made = match (t.abi, mr.dmabuf()) {
                    (_, None) => Err("the region has no DMA-BUF".to_string()),
                    (KernelAbi::Upstream, Some(fd)) => {
                        netlink::bind_tx(&n.name, fd.as_raw_fd(), NETLINK_DEADLINE)
                            .map(RegionTx::Upstream)
                            .map_err(|e| e.to_string())
                    }
                    (KernelAbi::Tcpx, Some(fd)) => match &n.pci {
                        Some(pci) => devmem::sockabi::sys::tcpx_tx_pages(fd.as_fd(), pci)
                            .map(RegionTx::Tcpx)
                            .map_err(|e| format!("DMA_BUF_CREATE_PAGES for NIC {pci}: {e}")),
                        None => Err("the NIC has no PCI address".to_string()),
                    },
                };
                match made {
                    Ok(r) => Some(r),
                    Err(why) => {
                        tracing::warn!(nic = %n.name, "a CUDA region sends by the bounce path on this NIC: no devmem TX for it ({why})");
                        None
                    }
                }
            }
        };
        names.push(name);
    }
    mr.set_devmem_tx(names);
}

/// The region's bytes as the emulated NIC reads them.
fn memory_of(mr: &MemoryRegion) -> Option<Arc<dyn TxMemory>> {
    let len = mr.len();
    match mr.kind() {
        PtrKind::Host => Some(Arc::new(HostBytes {
            ptr: mr.addr() as *const u8,
            len,
        })),
        PtrKind::Cuda => {
            let ctx = Context::get(mr.inner.cuda_ordinal()?).ok()?;
            let span = mr.inner.device_span(0, len).ok()?;
            Some(Arc::new(DeviceBytes { ctx, span }))
        }
    }
}

/// A host region's memory.
struct HostBytes {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the bytes stay valid while the region is registered (owned, or
// the caller's contract for foreign memory), and the emulated NIC reads
// them only in a send of a job that holds the region; the binding that
// names them goes with the region.
unsafe impl Send for HostBytes {}
// SAFETY: as above; reads only.
unsafe impl Sync for HostBytes {}

impl TxMemory for HostBytes {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let fits = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(out.len()).map(|end| (o, end)))
            .filter(|&(_, end)| end <= self.len);
        let Some((o, _)) = fits else {
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        };
        // SAFETY: `o..o + out.len()` lies inside the region (checked above),
        // which is valid for reads while a send of it runs.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(o), out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

/// A CUDA region's memory, read by a device-to-host copy.
struct DeviceBytes {
    ctx: &'static Context,
    span: DeviceSpan,
}

impl TxMemory for DeviceBytes {
    fn len(&self) -> usize {
        devmem::cuda::mem::DeviceMem::device_len(&self.span)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let row = [Frag::new(offset, 0, out.len() as u32)];
        read_rows(self.ctx, None, &self.span, out, &row).map_err(std::io::Error::other)
    }
}
