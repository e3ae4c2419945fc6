//! Small descriptors travel packed: the initiator groups consecutive small
//! descriptors of a transfer into packs ([`plan`], sent as the `layout` of
//! its Write or Read), and each side moves a pack between its descriptors
//! and one pack buffer of their memory kind with one gather or one scatter
//! (DRAM: memcpy; VRAM: one batched CUDA copy, [`devmem::cuda::batch`],
//! finished by one event), so a pack crosses the wire as one tcpx message
//! instead of one message, and one CUDA round trip, per descriptor.
//!
//! Pack buffers are [`MAX_PACK`] bytes, registered with tcpx once and
//! reused: a few per memory location and direction per engine ([`Packs`]).
//! Sends and receives draw on separate pools, so a peer's packs in flight
//! to us can never hold up our own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devmem::cuda::batch::{self, CopyList, Method};
use devmem::cuda::mem::{DeviceBuffer, Stream};
use devmem::cuda::Context;
use tcpx::{HostMemory, MemoryRegion, Net, PtrKind};

use crate::error::{Error, Result};
use crate::proto::MAX_PACK;
use crate::registry::{LocalRegion, Mem};

/// Largest descriptor packed when both sides are VRAM: gathering it is a
/// device-to-device copy (microseconds), and a pack of several such moves
/// as one message with few large staging copies instead of one CUDA round
/// trip per chunk of each.
const VRAM_MAX_DESC: u64 = 1 << 20;
/// Largest descriptor packed between VRAM and DRAM: the DRAM side pays a
/// CPU copy, which beats a CUDA round trip per descriptor on the VRAM side
/// for descriptors that would travel inline on the control socket.
const MIXED_MAX_DESC: u64 = 64 << 10;
/// Pack size between VRAM and DRAM: several packs per transfer, so the
/// copy into one overlaps the wire of the one before.
const MIXED_PACK: u64 = 1 << 20;
/// Pack buffers per memory location and direction.
const BUFS: usize = 8;
/// Longest a gather or scatter on the GPU may take (microseconds normally).
const COPY_DEADLINE: Duration = Duration::from_secs(10);

/// One descriptor as the side that moves it sees it: registration, offset
/// in its memory region, length.
pub(crate) type Piece = (Arc<LocalRegion>, usize, usize);

/// The layout of a transfer (see PROTOCOL.md, "Packs"): how many
/// consecutive descriptors each payload message carries, for descriptors
/// `descs` (length, local memory kind), moving to or from
/// remote memory of kind `remote`. Where VRAM is involved (or `pack_dram`,
/// the backend option), a run of
/// descriptors small enough to pack, of one local kind, fills a pack up to
/// its size; a single descriptor travels on its own. DRAM to DRAM never
/// packs: small messages travel inline on the control socket, copied once
/// each way, and a pack's copies and its round trip for the receiver's post
/// cost more (measured: 64 KiB descriptors at half the GB/s, 4-8 KiB ones
/// no faster), unless `pack_dram` asks for it.
pub(crate) fn plan(
    descs: impl IntoIterator<Item = (u64, Mem)>,
    remote: Mem,
    pack_dram: bool,
) -> Vec<u32> {
    let mut out = Vec::new();
    let (mut n, mut bytes, mut kind) = (0u32, 0u64, None);
    for (len, k) in descs {
        let (max_desc, pack) = match (k, remote) {
            (Mem::Vram, Mem::Vram) => (VRAM_MAX_DESC, MAX_PACK as u64),
            (Mem::Dram, Mem::Dram) if !pack_dram => (0, 0),
            _ => (MIXED_MAX_DESC, MIXED_PACK),
        };
        let packable = len <= max_desc && max_desc > 0;
        if n > 0 && (!packable || kind != Some(k) || bytes + len > pack) {
            out.push(n);
            (n, bytes) = (0, 0);
        }
        if !packable {
            out.push(1);
            continue;
        }
        n += 1;
        bytes += len;
        kind = Some(k);
    }
    if n > 0 {
        out.push(n);
    }
    out
}

/// Where a pack buffer lives: host memory or one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Home {
    Host,
    Gpu(i32),
}

/// Which pool a buffer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Dir {
    Send,
    Recv,
}

/// A pack buffer's memory and, on a GPU, what its copies run on.
struct Buffer {
    /// Declared first: the registration goes before the GPU memory.
    mr: MemoryRegion,
    gpu: Option<Gpu>,
}

struct Gpu {
    ctx: &'static Context,
    stream: Stream,
    list: CopyList,
    /// Declared last: freed after the registration and the stream.
    dev: DeviceBuffer,
}

/// A pool: direction and where its buffers live.
type Pool = (Dir, Home);

/// The engine's pack buffers, made on first use and reused.
#[derive(Default)]
pub(crate) struct Packs {
    free: Mutex<HashMap<Pool, Vec<Buffer>>>,
    made: Mutex<HashMap<Pool, usize>>,
}

impl Packs {
    /// A free buffer for pieces of memory kind `kind` (on the GPU of the
    /// first piece), or `None` while every buffer of that pool is in use.
    pub fn take(
        self: &Arc<Self>,
        net: &Net,
        dir: Dir,
        pieces: &[Piece],
    ) -> Result<Option<PackBuf>> {
        let home = match pieces.first() {
            Some((r, _, _)) if r.kind == Mem::Vram => Home::Gpu(r.gpu.unwrap_or(0)),
            _ => Home::Host,
        };
        let key = (dir, home);
        {
            let mut free = lock(&self.free);
            let list = free.entry(key).or_default();
            // A buffer whose failed transfer still holds it waits its turn.
            if let Some(i) = list.iter().position(|m| !m.mr.in_flight()) {
                let mem = list.swap_remove(i);
                return Ok(Some(PackBuf::new(self, key, mem)));
            }
        }
        {
            let mut made = lock(&self.made);
            let n = made.entry(key).or_default();
            if *n >= BUFS {
                return Ok(None);
            }
            *n += 1;
        }
        let mem = match Self::make(net, home) {
            Ok(m) => m,
            Err(e) => {
                *lock(&self.made).entry(key).or_default() -= 1;
                return Err(e);
            }
        };
        Ok(Some(PackBuf::new(self, key, mem)))
    }

    fn make(net: &Net, home: Home) -> Result<Buffer> {
        match home {
            Home::Host => Ok(Buffer {
                mr: net.reg_mr(HostMemory::zeroed(MAX_PACK)?),
                gpu: None,
            }),
            Home::Gpu(ordinal) => {
                let cuda = |e: devmem::cuda::CudaError| Error::Cuda(e.to_string());
                let ctx = Context::get(ordinal).map_err(cuda)?;
                let dev = tcpx::cuda_alloc(ordinal, MAX_PACK)?;
                // SAFETY: `dev` is device memory of MAX_PACK bytes that lives
                // in the same Gpu beside the registration, freed after it.
                let mr = unsafe { net.reg_mr_raw(dev.ptr() as *mut u8, MAX_PACK, PtrKind::Cuda)? };
                Ok(Buffer {
                    mr,
                    gpu: Some(Gpu {
                        ctx,
                        stream: Stream::new(ctx).map_err(cuda)?,
                        list: CopyList::new(ctx).map_err(cuda)?,
                        dev,
                    }),
                })
            }
        }
    }
}

/// A pack buffer taken from its pool; it goes back when dropped.
pub(crate) struct PackBuf {
    mem: Option<Box<Buffer>>,
    home: Arc<Packs>,
    key: Pool,
    /// Bytes of the pack it holds.
    len: usize,
}

impl PackBuf {
    fn new(home: &Arc<Packs>, key: Pool, mem: Buffer) -> Self {
        PackBuf {
            mem: Some(Box::new(mem)),
            home: home.clone(),
            key,
            len: 0,
        }
    }

    fn mem(&mut self) -> Result<&mut Buffer> {
        self.mem
            .as_deref_mut()
            .ok_or_else(|| Error::Cuda("pack buffer lost after a hung GPU copy".into()))
    }

    /// The registration the pack is sent from or received into.
    pub fn mr(&self) -> Option<&MemoryRegion> {
        self.mem.as_ref().map(|m| &m.mr)
    }

    /// Bytes of the pack it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Readies the buffer to receive the pack of `pieces`.
    pub fn expect(&mut self, pieces: &[Piece]) -> Result<()> {
        self.len = total(pieces)?;
        Ok(())
    }

    /// Copies `pieces` back to back into the buffer.
    pub fn gather(&mut self, pieces: &[Piece]) -> Result<()> {
        self.len = total(pieces)?;
        self.copy(pieces, true)
    }

    /// Copies the buffer's bytes back out to `pieces`, in order.
    pub fn scatter(&mut self, pieces: &[Piece]) -> Result<()> {
        if total(pieces)? != self.len {
            return Err(Error::Protocol(format!(
                "a pack of {} bytes for descriptors of {}",
                self.len,
                total(pieces)?
            )));
        }
        self.copy(pieces, false)
    }

    fn copy(&mut self, pieces: &[Piece], gather: bool) -> Result<()> {
        let m = self.mem()?;
        let Some(g) = m.gpu.as_mut() else {
            let buf = m.mr.bytes_mut()?;
            let mut at = 0;
            for (r, off, len) in pieces {
                let user = r.host_bytes(*off, *len)?;
                let ours = &mut buf[at..at + len];
                // SAFETY: `user` is `len` bytes of a DRAM registration that
                // stays valid while the transfer holds it (Registry::register's
                // contract); the pack buffer is a separate allocation.
                unsafe {
                    if gather {
                        std::ptr::copy_nonoverlapping(user, ours.as_mut_ptr(), *len);
                    } else {
                        std::ptr::copy_nonoverlapping(ours.as_ptr(), user, *len);
                    }
                }
                at += len;
            }
            return Ok(());
        };
        g.list.clear();
        let mut one_gpu = true;
        let mut at = g.dev.ptr();
        for (r, off, len) in pieces {
            let user = r.device_addr(*off, *len)?;
            one_gpu &= r.gpu == Some(g.ctx.ordinal());
            if gather {
                g.list.push(at, user, *len);
            } else {
                g.list.push(user, at, *len);
            }
            at += *len as u64;
        }
        let how = if one_gpu {
            batch::best(g.ctx)
        } else {
            Method::Each
        };
        // SAFETY: every piece lies inside a VRAM registration that stays
        // valid while the transfer holds it; the pack range lies inside
        // `dev` (total checked against MAX_PACK); no request uses the pack
        // meanwhile (taken free, sent or received only after the gather,
        // scattered only after its receive completed).
        let ran = unsafe { g.list.run(&g.stream, how, COPY_DEADLINE) };
        if let Err(e) = ran {
            if matches!(e, devmem::cuda::CudaError::Timeout { .. }) {
                // A copy that may still run keeps its buffer: never reused.
                std::mem::forget(self.mem.take());
            }
            return Err(Error::Cuda(e.to_string()));
        }
        Ok(())
    }
}

impl Drop for PackBuf {
    fn drop(&mut self) {
        if let Some(m) = self.mem.take() {
            lock(&self.home.free).entry(self.key).or_default().push(*m);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No invariant spans a panic here: the maps only hold free buffers.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One payload message of a layout: a descriptor alone, or a pack.
pub(crate) enum Run {
    One(Piece),
    Pack(Vec<Piece>),
}

/// Splits `pieces` into payload messages by `layout` (entries adding up
/// to their count, as the protocol checks); a lone descriptor costs no
/// allocation.
pub(crate) fn split(pieces: Vec<Piece>, layout: &[u32]) -> impl Iterator<Item = Run> + '_ {
    let mut it = pieces.into_iter();
    layout.iter().filter_map(move |&k| match k {
        1 => it.next().map(Run::One),
        k => Some(Run::Pack(it.by_ref().take(k as usize).collect())),
    })
}

/// Bytes of a pack of `pieces`, which must fit a pack buffer.
pub(crate) fn total(pieces: &[Piece]) -> Result<usize> {
    let n: usize = pieces.iter().map(|p| p.2).sum();
    if n > MAX_PACK {
        return Err(Error::Protocol(format!(
            "a pack of {n} bytes exceeds {MAX_PACK}"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(lens: &[u64], kinds: &[Mem], remote: Mem, pack_dram: bool) -> Vec<u32> {
        plan(
            lens.iter().copied().zip(kinds.iter().copied()),
            remote,
            pack_dram,
        )
    }

    fn lens_of(plan: &[u32]) -> usize {
        plan.iter().map(|&n| n as usize).sum()
    }

    #[test]
    fn small_descriptors_fill_packs_and_large_ones_go_alone() {
        let (d, v) = (Mem::Dram, Mem::Vram);
        assert_eq!(plan_of(&[], &[], d, false), Vec::<u32>::new());
        // DRAM to DRAM: packed only when asked (the backend option pack_dram).
        assert_eq!(plan_of(&[8 << 10; 128], &[d; 128], d, false), vec![1; 128]);
        assert_eq!(plan_of(&[8 << 10; 128], &[d; 128], d, true), vec![128]);
        // VRAM and DRAM: up to 64 KiB in 1 MiB packs, 16 of 64 KiB each.
        assert_eq!(plan_of(&[8 << 10; 128], &[d; 128], v, false), vec![128]);
        assert_eq!(
            plan_of(&[64 << 10; 40], &[v; 40], d, false),
            vec![16, 16, 8]
        );
        let lens = [4096, 4096, 1 << 20, 4096, (64 << 10) + 1, 7];
        assert_eq!(plan_of(&lens, &[d; 6], v, false), vec![2, 1, 1, 1, 1]);
        // VRAM on both sides: up to 1 MiB descriptors, 4 MiB packs.
        assert_eq!(plan_of(&[1 << 20; 9], &[v; 9], v, false), vec![4, 4, 1]);
        assert_eq!(plan_of(&[1 << 20; 9], &[v; 9], d, false), vec![1; 9]);
        // A change of local memory kind ends a pack.
        assert_eq!(
            plan_of(&[10, 10, 10, 10], &[d, v, v, d], v, false),
            vec![1, 2, 1]
        );
        for n in [1, 5, 1000, 8192] {
            let lens: Vec<u64> = (0..n).map(|i| (i % 7) * 9000 + 1).collect();
            for remote in [d, v] {
                let p = plan_of(&lens, &vec![d; n as usize], remote, false);
                assert_eq!(lens_of(&p), n as usize);
                assert!(p.iter().all(|&k| k >= 1));
            }
        }
    }
}
