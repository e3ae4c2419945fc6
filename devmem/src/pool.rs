//! The RX pool: device-memory pages that received fragments land in, and
//! the bookkeeping of which pages are lent out under which token.
//!
//! Memory is mapped from an fd (the mock gpumemd's memfd on CPU machines:
//! `mmap(MAP_SHARED)` of the size in its [`PoolMetadata`]), allocated
//! locally, or GPU memory imported from the daemon ([`RxPool::gpu`]). The
//! NIC writes through [`RxPool::land`] and [`RxPool::landing`] whatever the
//! memory: only where the bytes go differs (GPU readers order after them
//! with [`RxPool::readers_stream`]).
//!
//! Pages are 4 KiB; an allocation is a run of whole pages
//! named by a token until the token comes back. The pool never grows: when
//! no run fits, [`RxPool::alloc`] answers [`PoolError::Full`] and the
//! producer must wait for tokens (back-pressure) instead of overwriting.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::cuda::mem::Stream;
use crate::cuda::mirror::GpuMirror;
use crate::cuda::unpack::Frag;
use crate::cuda::vmm::MappedRange;
use crate::cuda::CudaError;
use crate::gpumemd::PoolMetadata;

/// Pool page size: the granularity of fragments and tokens.
pub const PAGE_SIZE: usize = 4096;

/// Errors of the RX pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No free run of pages is large enough: wait for tokens to come back.
    #[error(
        "RX pool full: {wanted} pages wanted, {free} of {total} free; give \
         tokens back (release) before receiving more"
    )]
    Full {
        /// Pages asked for.
        wanted: usize,
        /// Pages free (maybe not contiguous).
        free: usize,
        /// Pages in the pool.
        total: usize,
    },
    /// The pool size is unusable.
    #[error(
        "RX pool size {size} (align {align}) is unusable: it must be a \
         non-zero multiple of {PAGE_SIZE} bytes below 16 TiB; fix the daemon's metadata"
    )]
    BadSize {
        /// Bytes asked for.
        size: u64,
        /// Alignment from the metadata.
        align: u64,
    },
    /// The pool is larger than the kernel ABI can address.
    #[error("RX pool of {size} bytes is too large for the {abi} ABI (at most {max}); use a smaller pool")]
    TooLarge {
        /// Pool bytes.
        size: u64,
        /// Largest pool the ABI addresses.
        max: u64,
        /// The ABI's name.
        abi: &'static str,
    },
    /// An allocation of zero bytes or more than the pool holds.
    #[error("RX pool allocation of {len} bytes is invalid: ask for 1..={max} bytes")]
    BadLength {
        /// Bytes asked for.
        len: usize,
        /// Largest allocation the pool can satisfy.
        max: usize,
    },
    /// A write outside the pool or into pages not lent out.
    #[error(
        "landing {len} bytes at pool offset {offset} touches pages outside \
         the pool or not lent out; alloc the pages before writing them"
    )]
    NotLent {
        /// Pool offset of the write.
        offset: usize,
        /// Bytes.
        len: usize,
    },
    /// The copy into a GPU pool (or setting up its mirror) failed.
    #[error("GPU RX pool: {0}")]
    Device(#[from] CudaError),
    /// The legacy pool handle file is missing or unreadable.
    #[error("legacy RX pool import: {}: {reason}", path.display())]
    LegacyHandle {
        /// `<dir>/nvdma-<pci>`.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The pool is written by a real NIC, never through [`RxPool::land`].
    #[error(
        "this RX pool is GPU memory a devmem NIC writes itself; only the \
         emulated NIC lands bytes, into pools built with RxPool::gpu"
    )]
    NicOwned,
    /// `mmap` of the pool fd failed.
    #[error(
        "mmap of the RX pool fd ({size} bytes) failed: {source}; the fd must \
         be a memfd or file of at least that size opened read-write"
    )]
    Map {
        /// Bytes to map.
        size: usize,
        /// The OS error.
        #[source]
        source: crate::error::OsError,
    },
}

/// A run of pages lent out under `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Name of the run until it is released.
    pub token: u32,
    /// Byte offset of the first page in the pool.
    pub offset: u64,
    /// Pages in the run.
    pub pages: u32,
}

impl Grant {
    /// Bytes the run spans.
    pub const fn len(&self) -> usize {
        self.pages as usize * PAGE_SIZE
    }

    /// Whether the run is empty (never, for a granted run).
    pub const fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// Page bookkeeping without memory: which pages are free and which token
/// holds which run. Bounded by the page count; a token is the index of its
/// run's first page, so tokens of runs granted in order are consecutive and
/// coalesce into few `SO_DEVMEM_DONTNEED` ranges.
#[derive(Debug, Clone)]
pub struct PageAllocator {
    /// `run[p]` = pages of the outstanding run starting at page `p`, else 0.
    run: Vec<u32>,
    /// Whether page `p` is lent out.
    used: Vec<bool>,
    free: usize,
    /// Next-fit cursor: where the last run ended.
    cursor: usize,
}

impl PageAllocator {
    /// An allocator for `pages` pages, all free.
    pub fn new(pages: usize) -> Self {
        PageAllocator {
            run: vec![0; pages],
            used: vec![false; pages],
            free: pages,
            cursor: 0,
        }
    }

    /// Pages in total.
    pub fn pages(&self) -> usize {
        self.used.len()
    }

    /// Pages free.
    pub fn free_pages(&self) -> usize {
        self.free
    }

    /// Whether no page is lent out.
    pub fn all_free(&self) -> bool {
        self.free == self.used.len()
    }

    /// Lends out a run of `pages` contiguous pages (next-fit from the cursor).
    pub fn alloc(&mut self, pages: usize) -> Result<Grant, PoolError> {
        let total = self.used.len();
        if pages == 0 || pages > total {
            return Err(PoolError::BadLength {
                len: pages * PAGE_SIZE,
                max: total * PAGE_SIZE,
            });
        }
        if pages <= self.free {
            if let Some(start) = self.find(pages) {
                self.used[start..start + pages].fill(true);
                self.run[start] = pages as u32;
                self.free -= pages;
                self.cursor = (start + pages) % total;
                return Ok(Grant {
                    token: start as u32,
                    offset: (start * PAGE_SIZE) as u64,
                    pages: pages as u32,
                });
            }
        }
        Err(PoolError::Full {
            wanted: pages,
            free: self.free,
            total,
        })
    }

    fn find(&self, pages: usize) -> Option<usize> {
        let total = self.used.len();
        // Two passes: cursor..end, then 0..cursor (runs never wrap).
        for (lo, hi) in [(self.cursor, total), (0, self.cursor.min(total))] {
            let mut start = lo;
            let mut len = 0;
            for p in lo..hi {
                if self.used[p] {
                    len = 0;
                    start = p + 1;
                } else {
                    len += 1;
                    if len == pages {
                        return Some(start);
                    }
                }
            }
            // A run may continue past the cursor in the second pass.
            if lo == 0 && len > 0 {
                let extra = self.used[hi..].iter().take_while(|u| !**u).count();
                if len + extra >= pages {
                    return Some(start);
                }
            }
        }
        None
    }

    /// Whether every page of `start..start + len` bytes is lent out.
    pub fn lent(&self, start: usize, len: usize) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        len > 0
            && self
                .used
                .get(start / PAGE_SIZE..end.div_ceil(PAGE_SIZE))
                .is_some_and(|p| p.iter().all(|u| *u))
    }

    /// The run `token` holds, if it is outstanding.
    pub fn lookup(&self, token: u32) -> Option<Grant> {
        let p = usize::try_from(token).ok()?;
        match self.run.get(p) {
            Some(&n) if n > 0 => Some(Grant {
                token,
                offset: (p * PAGE_SIZE) as u64,
                pages: n,
            }),
            _ => None,
        }
    }

    /// Frees the run of `token`; `None` if no such run is outstanding (a
    /// double return or a token this pool never gave), which changes nothing.
    pub fn release(&mut self, token: u32) -> Option<Grant> {
        let g = self.lookup(token)?;
        let p = token as usize;
        self.run[p] = 0;
        self.used[p..p + g.pages as usize].fill(false);
        self.free += g.pages as usize;
        Some(g)
    }

    /// Outstanding tokens, in order (for leak checks and salvage on close).
    pub fn outstanding(&self) -> Vec<u32> {
        (0..self.run.len())
            .filter(|&p| self.run[p] > 0)
            .map(|p| p as u32)
            .collect()
    }
}

enum Backing {
    /// `munmap` on drop.
    Mapped,
    /// A leaked `Box<[u8]>`, rebuilt and freed on drop (a raw pointer, not
    /// a live box, so views made from `ptr` stay valid).
    Local,
    /// GPU memory; `ptr` is its host mirror, which owns itself.
    Gpu(Box<GpuMirror>),
    /// GPU memory a real NIC writes (no mirror; `ptr` is unused).
    Device(MappedRange),
}

/// RX pool memory plus its page bookkeeping.
pub struct RxPool {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
    pages: PageAllocator,
}

impl std::fmt::Debug for RxPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxPool")
            .field("len", &self.len)
            .field("mapped", &matches!(self.backing, Backing::Mapped))
            .field(
                "gpu",
                &matches!(self.backing, Backing::Gpu(_) | Backing::Device(_)),
            )
            .field("free_pages", &self.pages.free_pages())
            .finish()
    }
}

// SAFETY: the pool exclusively owns its mapping or box; access goes through
// &self / &mut self like any owned buffer.
unsafe impl Send for RxPool {}
// SAFETY: shared access only reads (host, device); writes and the GPU
// mirror's stream need &mut self.
unsafe impl Sync for RxPool {}

fn check_size(size: u64, align: u64) -> Result<usize, PoolError> {
    let ok = size > 0 && size % PAGE_SIZE as u64 == 0 && size < (1 << 44);
    match usize::try_from(size) {
        Ok(n) if ok => Ok(n),
        _ => Err(PoolError::BadSize { size, align }),
    }
}

impl RxPool {
    /// A pool of `size` bytes in local (heap) memory, zeroed.
    pub fn local(size: usize) -> Result<Self, PoolError> {
        let len = check_size(size as u64, PAGE_SIZE as u64)?;
        let mem: *mut [u8] = Box::into_raw(vec![0u8; len].into_boxed_slice());
        // A boxed slice pointer is never null.
        let ptr = NonNull::new(mem.cast::<u8>()).ok_or(PoolError::BadSize {
            size: size as u64,
            align: PAGE_SIZE as u64,
        })?;
        Ok(RxPool {
            ptr,
            len,
            backing: Backing::Local,
            pages: PageAllocator::new(len / PAGE_SIZE),
        })
    }

    /// Maps `md.size` bytes of `fd` (shared, read-write): the pool the
    /// daemon hands out (`GpumemdClient::rx_pool`). The fd may be closed
    /// afterwards; the mapping stays.
    pub fn map(fd: BorrowedFd<'_>, md: &PoolMetadata) -> Result<Self, PoolError> {
        Self::map_part(fd, md, 0, md.size)
    }

    /// Maps `len` bytes of the daemon's pool from `offset` (both multiples
    /// of the pool's alignment): one part of a pool shared by several sockets.
    pub fn map_part(
        fd: BorrowedFd<'_>,
        md: &PoolMetadata,
        offset: u64,
        len: u64,
    ) -> Result<Self, PoolError> {
        let len = check_size(len, md.align)?;
        let end = offset.checked_add(len as u64);
        if offset % md.align.max(1) != 0 || end.is_none_or(|e| e > md.size) {
            return Err(PoolError::BadSize {
                size: offset,
                align: md.align,
            });
        }
        // SAFETY: a fresh shared mapping at an address the kernel picks; no
        // existing memory is touched. The result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(PoolError::Map {
                size: len,
                source: std::io::Error::last_os_error().into(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(PoolError::Map {
            size: len,
            source: std::io::Error::from_raw_os_error(libc::EFAULT).into(),
        })?;
        Ok(RxPool {
            ptr,
            len,
            backing: Backing::Mapped,
            pages: PageAllocator::new(len / PAGE_SIZE),
        })
    }

    /// A pool in imported GPU memory (`cuda::vmm::import_pool` of the
    /// daemon's fd, or a part of it). Landed bytes reach the GPU on
    /// [`RxPool::readers_stream`], where unpack reads [`RxPool::device`]
    /// with a GPU kernel.
    pub fn gpu(mapping: impl Into<MappedRange>) -> Result<Self, PoolError> {
        let mapping = mapping.into();
        let len = check_size(mapping.size() as u64, PAGE_SIZE as u64)?;
        let mirror = Box::new(GpuMirror::new(mapping)?);
        let ptr = NonNull::new(mirror.host_ptr()).ok_or(PoolError::BadSize {
            size: len as u64,
            align: PAGE_SIZE as u64,
        })?;
        Ok(RxPool {
            ptr,
            len,
            backing: Backing::Gpu(mirror),
            pages: PageAllocator::new(len / PAGE_SIZE),
        })
    }

    /// GPU memory a kernel devmem socket receives into (gpumemd's pool, or
    /// a DMA-BUF bound with `bind-rx`): the NIC writes it, unpack reads
    /// [`RxPool::device`]; no host mirror is made.
    pub fn device_only(mapping: impl Into<MappedRange>) -> Result<Self, PoolError> {
        let mapping = mapping.into();
        let len = check_size(mapping.size() as u64, PAGE_SIZE as u64)?;
        Ok(RxPool {
            ptr: NonNull::dangling(),
            len,
            backing: Backing::Device(mapping),
            pages: PageAllocator::new(len / PAGE_SIZE),
        })
    }

    /// Pool bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the pool has no bytes (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool's memory, for a CPU unpack; `None` for a GPU pool.
    pub fn host(&self) -> Option<&[u8]> {
        if matches!(self.backing, Backing::Gpu(_) | Backing::Device(_)) {
            return None;
        }
        // SAFETY: ptr/len describe memory this pool owns (box or mapping)
        // for its whole life. A mapped pool may also be written by the
        // daemon's process; it only writes pages we have not lent out.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) })
    }

    /// The GPU memory, for a GPU unpack; `None` for a host pool.
    pub fn device(&self) -> Option<&MappedRange> {
        match &self.backing {
            Backing::Gpu(m) => Some(m.mapping()),
            Backing::Device(m) => Some(m),
            _ => None,
        }
    }

    /// The NIC's DMA: writes `bytes` at `offset`, in pages that must be
    /// lent out. Readers of a GPU pool see them through
    /// [`RxPool::readers_stream`].
    pub fn land(&mut self, offset: usize, bytes: &[u8]) -> Result<(), PoolError> {
        let len = bytes.len();
        if matches!(self.backing, Backing::Device(_)) {
            return Err(PoolError::NicOwned);
        }
        if len == 0 {
            return Ok(());
        }
        if !self.pages.lent(offset, len) {
            return Err(PoolError::NotLent { offset, len });
        }
        // SAFETY: offset..offset+len lies in the pool (lent pages exist);
        // &mut self makes this the only access to the landing memory.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) };
        dst.copy_from_slice(bytes);
        if let Backing::Gpu(m) = &mut self.backing {
            m.mark(offset, len)?;
        }
        Ok(())
    }

    /// The NIC's DMA without a copy in between: writable views of the
    /// `(offset, len)` ranges, each inside pages lent out, pairwise
    /// disjoint, for one `readv`. Readers of a GPU pool see the bytes
    /// through [`RxPool::readers_stream`] (the copy takes every range whole).
    pub fn landing(
        &mut self,
        ranges: &[(usize, usize)],
    ) -> Result<Vec<std::io::IoSliceMut<'_>>, PoolError> {
        if matches!(self.backing, Backing::Device(_)) {
            return Err(PoolError::NicOwned);
        }
        let mut sorted: Vec<(usize, usize)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
        sorted.sort_unstable();
        for (i, &(offset, len)) in sorted.iter().enumerate() {
            let overlaps = sorted.get(i + 1).is_some_and(|next| offset + len > next.0);
            if !self.pages.lent(offset, len) || overlaps {
                return Err(PoolError::NotLent { offset, len });
            }
        }
        if let Backing::Gpu(m) = &mut self.backing {
            // Marked before the read fills them: one span, so no range is
            // flushed before its bytes land.
            if let (Some(first), Some(end)) =
                (sorted.first(), sorted.iter().map(|r| r.0 + r.1).max())
            {
                m.mark_ahead(first.0, end)?;
            }
        }
        let base = self.ptr.as_ptr();
        Ok(ranges
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(offset, len)| {
                // SAFETY: each range lies in lent pages of the pool (checked
                // above), the ranges are pairwise disjoint, and `&mut self`
                // keeps every other access out while the views live.
                let b = unsafe { std::slice::from_raw_parts_mut(base.add(offset), len) };
                std::io::IoSliceMut::new(b)
            })
            .collect())
    }

    /// Queues the copy of the bytes landed so far to a GPU pool now,
    /// rather than when a reader asks ([`RxPool::readers_stream`]); host
    /// pools have nothing to do.
    pub fn commit(&mut self) -> Result<(), PoolError> {
        if let Backing::Gpu(m) = &self.backing {
            m.flush()?;
        }
        Ok(())
    }

    /// For readers of a GPU pool the emulated NIC writes: the stream on
    /// which work queued next sees every byte landed so far (their copy is
    /// queued first). `None` for pools a NIC writes, whose receive returns
    /// once the bytes landed, and for host pools.
    pub fn readers_stream(&self) -> Result<Option<&Stream>, PoolError> {
        match &self.backing {
            Backing::Gpu(m) => Ok(Some(m.readers_stream()?)),
            _ => Ok(None),
        }
    }

    /// As [`RxPool::readers_stream`] for a reader of only the source ranges
    /// of `rows` who waits for them at once (a chunk header): a stream on
    /// which they landed first, not queued behind the pool's other work.
    pub fn rows_stream(&self, rows: &[Frag]) -> Result<Option<&Stream>, PoolError> {
        match &self.backing {
            Backing::Gpu(m) => Ok(Some(m.rows_stream(rows)?)),
            _ => Ok(None),
        }
    }

    /// The page bookkeeping.
    pub fn pages(&self) -> &PageAllocator {
        &self.pages
    }

    /// Lends out enough whole pages for `len` bytes.
    pub fn alloc(&mut self, len: usize) -> Result<Grant, PoolError> {
        if len == 0 || len > self.len {
            return Err(PoolError::BadLength { len, max: self.len });
        }
        self.pages.alloc(len.div_ceil(PAGE_SIZE))
    }

    /// Gives `token`'s pages back; `None` if it was not outstanding.
    pub fn release(&mut self, token: u32) -> Option<Grant> {
        self.pages.release(token)
    }

    /// Pages free.
    pub fn free_pages(&self) -> usize {
        self.pages.free_pages()
    }

    /// Tokens lent out and not yet returned.
    pub fn outstanding(&self) -> Vec<u32> {
        self.pages.outstanding()
    }
}

impl Drop for RxPool {
    fn drop(&mut self) {
        match self.backing {
            Backing::Mapped => {
                // SAFETY: ptr/len are exactly the mapping made in map(),
                // unmapped once; no slice borrowed from it outlives &mut self.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            }
            Backing::Local => {
                let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
                // SAFETY: raw is exactly the Box::into_raw of local(), freed once.
                drop(unsafe { Box::from_raw(raw) });
            }
            Backing::Gpu(_) | Backing::Device(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landing_views_only_lent_disjoint_ranges() {
        let mut p = RxPool::local(4 * PAGE_SIZE).unwrap();
        let a = p.alloc(1).unwrap();
        let b = p.alloc(1).unwrap();
        {
            let mut v = p
                .landing(&[(b.offset as usize + 10, 5), (a.offset as usize, 3)])
                .unwrap();
            v[0].copy_from_slice(b"hello");
            v[1].copy_from_slice(b"abc");
        }
        let h = p.host().unwrap();
        assert_eq!(&h[b.offset as usize + 10..][..5], b"hello");
        assert_eq!(&h[a.offset as usize..][..3], b"abc");
        // Not lent, overlapping, or past the pool: refused.
        assert!(p.landing(&[(2 * PAGE_SIZE, 1)]).is_err());
        assert!(p.landing(&[(0, 10), (5, 10)]).is_err());
        assert!(p.landing(&[(PAGE_SIZE, PAGE_SIZE + 1)]).is_err());
    }

    #[test]
    fn fills_then_refuses_instead_of_overwriting() {
        let mut p = RxPool::local(4 * PAGE_SIZE).unwrap();
        let grants: Vec<_> = (0..4).map(|_| p.alloc(100).unwrap()).collect();
        assert_eq!(
            grants.iter().map(|g| g.token).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert!(matches!(
            p.alloc(1),
            Err(PoolError::Full {
                wanted: 1,
                free: 0,
                total: 4
            })
        ));
        assert_eq!(p.release(2).map(|g| g.offset), Some(2 * PAGE_SIZE as u64));
        assert_eq!(p.alloc(PAGE_SIZE).unwrap().offset, 2 * PAGE_SIZE as u64);
    }

    #[test]
    fn double_and_unknown_returns_change_nothing() {
        let mut p = RxPool::local(2 * PAGE_SIZE).unwrap();
        let g = p.alloc(1).unwrap();
        assert!(p.release(g.token).is_some());
        assert!(p.release(g.token).is_none());
        assert!(p.release(1).is_none());
        assert!(p.release(u32::MAX).is_none());
        assert_eq!(p.free_pages(), 2);
    }

    #[test]
    fn runs_are_contiguous_and_fragmentation_is_reported_as_full() {
        let mut a = PageAllocator::new(8);
        let r: Vec<_> = (0..4).map(|_| a.alloc(2).unwrap()).collect();
        a.release(r[0].token);
        a.release(r[2].token);
        // 4 pages free, but no 3 in a row.
        assert!(matches!(a.alloc(3), Err(PoolError::Full { free: 4, .. })));
        a.release(r[1].token);
        assert!(matches!(a.alloc(7), Err(PoolError::Full { free: 6, .. })));
        assert_eq!(a.alloc(6).unwrap().offset, 0);
        assert_eq!(a.outstanding(), vec![0, 6]);
    }

    #[test]
    fn wraps_around_from_the_cursor() {
        let mut a = PageAllocator::new(4);
        let g: Vec<_> = (0..4).map(|_| a.alloc(1).unwrap()).collect();
        a.release(g[0].token);
        a.release(g[1].token);
        // Cursor is at 0 after the last grant; a run of 2 at 0 fits.
        assert_eq!(a.alloc(2).unwrap().token, 0);
        a.release(0);
        a.release(g[3].token);
        // Pages 0,1 and 3 free; the cursor is 2: the run 3.. is too short, 0..2 fits.
        assert_eq!(a.alloc(2).unwrap().token, 0);
        assert_eq!(a.alloc(1).unwrap().token, 3);
        assert!(a.alloc(1).is_err());
    }

    #[test]
    fn landing_outside_lent_pages_is_refused() {
        let mut p = RxPool::local(4 * PAGE_SIZE).unwrap();
        let g = p.alloc(2 * PAGE_SIZE).unwrap();
        let at = g.offset as usize;
        p.land(at + PAGE_SIZE - 1, b"ab").unwrap();
        assert_eq!(&p.host().unwrap()[at + PAGE_SIZE - 1..][..2], b"ab");
        for (offset, len) in [(at + 2 * PAGE_SIZE - 1, 2), (at + 2 * PAGE_SIZE, 1)] {
            assert!(matches!(
                p.land(offset, &vec![1; len]),
                Err(PoolError::NotLent { .. })
            ));
        }
        assert!(matches!(
            p.land(usize::MAX, b"x"),
            Err(PoolError::NotLent { .. })
        ));
        assert!(p.device().is_none());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(RxPool::local(0), Err(PoolError::BadSize { .. })));
        assert!(matches!(
            RxPool::local(5000),
            Err(PoolError::BadSize { .. })
        ));
        let mut p = RxPool::local(PAGE_SIZE).unwrap();
        assert!(matches!(p.alloc(0), Err(PoolError::BadLength { .. })));
        assert!(matches!(
            p.alloc(PAGE_SIZE + 1),
            Err(PoolError::BadLength { .. })
        ));
    }

    #[test]
    fn maps_a_memfd_and_sees_writes_through_the_fd() {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::fd::AsFd;
        let fd =
            nix::sys::memfd::memfd_create(c"pool-test", nix::sys::memfd::MemFdCreateFlag::empty())
                .unwrap();
        nix::unistd::ftruncate(&fd, 8 * PAGE_SIZE as i64).unwrap();
        let md = PoolMetadata {
            daemon_fd: 3,
            size: 8 * PAGE_SIZE as u64,
            align: PAGE_SIZE as u64,
        };
        let mut p = RxPool::map(fd.as_fd(), &md).unwrap();
        assert_eq!(p.pages().pages(), 8);
        let g = p.alloc(10).unwrap();
        p.land(g.offset as usize, b"hello").unwrap();
        let mut f = std::fs::File::from(fd);
        f.seek(SeekFrom::Start(g.offset)).unwrap();
        let mut buf = [0u8; 5];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn mapping_past_the_end_of_a_pipe_fails_typed() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let md = PoolMetadata {
            daemon_fd: 3,
            size: PAGE_SIZE as u64,
            align: PAGE_SIZE as u64,
        };
        use std::os::fd::AsFd;
        assert!(matches!(
            RxPool::map(r.as_fd(), &md),
            Err(PoolError::Map { .. })
        ));
    }
}
