//! A GPU RX pool shared across processes the way tcpgpudmarxd does it
//! (`cuda/cu_dmabuf_gpu_page_allocator.cu`): `cuMemCreate` (pinned, device
//! location, POSIX-fd handle type) at the allocation granularity, exported
//! with `cuMemExportToShareableHandle`, mapped with reserve/map/set-access.
//! The importer does `cuMemImportFromShareableHandle` and the same mapping.
//!
//! The same [`Mapping`] type also holds the two other pool memories: the
//! legacy import (a `CUipcMemHandle` opened with `cuIpcOpenMemHandle`, as
//! the TCPX plugin does with `/tmp/nvdma-<pci>`) and plain `cuMemAlloc`
//! memory, which upstream devmem binds to RX queues as a DMA-BUF.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use super::{ck, sys, Context, CudaError, Result};

fn prop(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: an all-zero CUmemAllocationProp is the documented "no options" value.
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = ordinal;
    p.requestedHandleTypes =
        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    p
}

/// Minimum allocation granularity for a shareable pool on the device.
pub fn granularity(ctx: &'static Context) -> Result<usize> {
    ctx.make_current()?;
    let p = prop(ctx.ordinal());
    let mut g = 0usize;
    // SAFETY: p is a valid prop; writes one size.
    ck("cuMemGetAllocationGranularity", || unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &p,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    })?;
    Ok(g.max(1))
}

/// Device memory of a pool mapped into this process.
#[derive(Debug)]
pub struct Mapping {
    ctx: &'static Context,
    kind: Kind,
    ptr: u64,
    size: usize,
}

/// How the memory came, and so how it goes.
#[derive(Debug)]
enum Kind {
    /// A VMM allocation: unmap, release, free the address range.
    Vmm(sys::CUmemGenericAllocationHandle),
    /// Another process's allocation opened by IPC handle: close it.
    Ipc,
    /// `cuMemAlloc` memory: free it.
    Alloc,
}

/// Bytes of a `CUipcMemHandle` (the legacy pool file holds exactly these).
pub const IPC_HANDLE_LEN: usize = 64;

impl Mapping {
    fn map(
        ctx: &'static Context,
        handle: sys::CUmemGenericAllocationHandle,
        size: usize,
        align: usize,
    ) -> Result<Self> {
        let mut ptr = 0;
        // SAFETY: writes one address.
        let r = ck("cuMemAddressReserve", || unsafe {
            sys::cuMemAddressReserve(&mut ptr, size, align, 0, 0)
        });
        if let Err(e) = r {
            // SAFETY: we own the handle and give it up on failure.
            unsafe { sys::cuMemRelease(handle) };
            return Err(e);
        }
        let m = Mapping {
            ctx,
            kind: Kind::Vmm(handle),
            ptr,
            size,
        };
        // SAFETY: the range was just reserved for this size; handle is live.
        ck("cuMemMap", || unsafe {
            sys::cuMemMap(ptr, size, 0, handle, 0)
        })?;
        let access = sys::CUmemAccessDesc {
            location: prop(ctx.ordinal()).location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: one descriptor for the mapped range.
        ck("cuMemSetAccess", || unsafe {
            sys::cuMemSetAccess(ptr, size, &access, 1)
        })?;
        Ok(m)
    }

    /// Opens another process's allocation from its IPC handle, as the TCPX
    /// plugin's legacy import does (`cuIpcOpenMemHandle` with
    /// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`); the size is the allocation's
    /// (`cuMemGetAddressRange`), which the handle does not carry.
    pub fn ipc_open(ctx: &'static Context, handle: &[u8; IPC_HANDLE_LEN]) -> Result<Self> {
        ctx.make_current()?;
        let mut h = sys::CUipcMemHandle {
            reserved: [0; IPC_HANDLE_LEN],
        };
        for (d, s) in h.reserved.iter_mut().zip(handle) {
            *d = *s as std::ffi::c_char;
        }
        let mut ptr = 0;
        // SAFETY: writes one device pointer; the handle is passed by value.
        ck("cuIpcOpenMemHandle", || unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        // Closed on drop if the size query fails.
        let mut m = Mapping {
            ctx,
            kind: Kind::Ipc,
            ptr,
            size: 0,
        };
        let (mut base, mut size) = (0, 0usize);
        // SAFETY: writes one base and one size for a pointer we just opened.
        ck("cuMemGetAddressRange", || unsafe {
            sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr)
        })?;
        m.size = size.saturating_sub((ptr - base) as usize);
        Ok(m)
    }

    /// `size` bytes of `cuMemAlloc` memory (4 KiB aligned, as DMA-BUF
    /// export needs).
    pub fn alloc(ctx: &'static Context, size: usize) -> Result<Self> {
        ctx.make_current()?;
        let mut ptr = 0;
        // SAFETY: writes one device pointer.
        ck("cuMemAlloc", || unsafe {
            sys::cuMemAlloc_v2(&mut ptr, size.max(1))
        })?;
        Ok(Mapping {
            ctx,
            kind: Kind::Alloc,
            ptr,
            size,
        })
    }

    /// The IPC handle of `cuMemAlloc` memory, for another process to open
    /// (the mock daemon's legacy pool file).
    pub fn ipc_handle(&self) -> Result<[u8; IPC_HANDLE_LEN]> {
        if !matches!(self.kind, Kind::Alloc) {
            return Err(CudaError::InvalidArgument(
                "only cuMemAlloc memory has a CUDA IPC handle".into(),
            ));
        }
        self.ctx.make_current()?;
        let mut h = sys::CUipcMemHandle {
            reserved: [0; IPC_HANDLE_LEN],
        };
        // SAFETY: writes one handle for memory this mapping owns.
        ck("cuIpcGetMemHandle", || unsafe {
            sys::cuIpcGetMemHandle(&mut h, self.ptr)
        })?;
        Ok(h.reserved.map(|b| b as u8))
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The context the mapping lives in.
    pub fn context(&self) -> &'static Context {
        self.ctx
    }

    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.ctx.make_current().is_err() {
            return;
        }
        match self.kind {
            // SAFETY: tear down in reverse; an unmap of a never-mapped range fails harmlessly.
            Kind::Vmm(handle) => unsafe {
                let _ = sys::cuMemUnmap(self.ptr, self.size);
                let _ = sys::cuMemRelease(handle);
                let _ = sys::cuMemAddressFree(self.ptr, self.size);
            },
            // SAFETY: the pointer came from cuIpcOpenMemHandle, closed once.
            Kind::Ipc => unsafe {
                let _ = sys::cuIpcCloseMemHandle(self.ptr);
            },
            // SAFETY: the pointer came from cuMemAlloc, freed once.
            Kind::Alloc => unsafe {
                let _ = sys::cuMemFree_v2(self.ptr);
            },
        }
    }
}

/// A part of a mapping (a whole imported pool is cut into one part per
/// socket); keeps the mapping alive.
#[derive(Debug, Clone)]
pub struct MappedRange {
    mapping: Arc<Mapping>,
    offset: usize,
    len: usize,
}

impl MappedRange {
    /// Bytes `offset..offset + len` of `mapping`.
    pub fn new(mapping: Arc<Mapping>, offset: usize, len: usize) -> Result<Self> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= mapping.size() => Ok(MappedRange {
                mapping,
                offset,
                len,
            }),
            _ => Err(CudaError::InvalidArgument(format!(
                "bytes {offset}+{len} are not a non-empty part of the {}-byte mapping",
                mapping.size()
            ))),
        }
    }

    /// Device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.mapping.ptr() + self.offset as u64
    }

    pub fn size(&self) -> usize {
        self.len
    }

    pub fn context(&self) -> &'static Context {
        self.mapping.context()
    }
}

impl From<Mapping> for MappedRange {
    fn from(m: Mapping) -> Self {
        let len = m.size();
        MappedRange {
            mapping: Arc::new(m),
            offset: 0,
            len,
        }
    }
}

/// The daemon's side: a shareable GPU pool and its POSIX fd.
#[derive(Debug)]
pub struct ExportedPool {
    pub mapping: Mapping,
    pub fd: OwnedFd,
    pub align: usize,
}

impl ExportedPool {
    /// Allocates at least `size` bytes (rounded up to the granularity).
    pub fn create(ctx: &'static Context, size: usize) -> Result<Self> {
        let align = granularity(ctx)?;
        let size = size.div_ceil(align).max(1) * align;
        let p = prop(ctx.ordinal());
        let mut handle = 0;
        // SAFETY: p is valid; writes one handle.
        ck("cuMemCreate", || unsafe {
            sys::cuMemCreate(&mut handle, size, &p, 0)
        })?;
        let mut fd: i32 = -1;
        // SAFETY: POSIX_FILE_DESCRIPTOR writes one int.
        let r = ck("cuMemExportToShareableHandle", || unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut i32).cast(),
                handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        });
        if let Err(e) = r {
            // SAFETY: we own the handle.
            unsafe { sys::cuMemRelease(handle) };
            return Err(e);
        }
        // SAFETY: a fresh fd from the driver, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mapping = Mapping::map(ctx, handle, size, align)?;
        Ok(ExportedPool { mapping, fd, align })
    }
}

/// The client's side: imports a pool fd received from the daemon.
pub fn import_pool(
    ctx: &'static Context,
    fd: BorrowedFd<'_>,
    size: usize,
    align: usize,
) -> Result<Mapping> {
    if size == 0 {
        return Err(CudaError::InvalidArgument("pool of 0 bytes".into()));
    }
    ctx.make_current()?;
    let g = granularity(ctx)?;
    let align = align.max(g);
    if size % g != 0 {
        return Err(CudaError::InvalidArgument(format!(
            "pool size {size} is not a multiple of the granularity {g}"
        )));
    }
    let mut handle = 0;
    // SAFETY: for POSIX fds the "handle" argument is the fd value itself.
    ck("cuMemImportFromShareableHandle", || unsafe {
        sys::cuMemImportFromShareableHandle(
            &mut handle,
            fd.as_raw_fd() as usize as *mut std::ffi::c_void,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        )
    })?;
    Mapping::map(ctx, handle, size, align)
}
