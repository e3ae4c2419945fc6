//! Unpack: gathering received fragments into the destination buffer.
//!
//! A receive yields [`Fragment`]s in stream order: pool fragments (bytes in
//! the RX pool) and linear ones (bytes in the recvmsg iov). [`plan`] turns
//! them into two gather lists of [`Frag`] rows — the 16-byte layout the CUDA
//! kernel reads (`cuda::unpack`) — one from the pool, one from the linear
//! buffer, each with its destination offset. An [`Unpack`] runs a list in
//! batches of at most [`MAX_BATCH`] rows: the original plugin exits the
//! process past `TCPX_UNPACK_MAX_SLICE_PAGES` fragments per slice; we split.
#![forbid(unsafe_code)]

pub use crate::cuda::unpack::Frag;
use crate::sockabi::abi::tcpx::UNPACK_MAX_SLICE_PAGES;
use crate::sockabi::Fragment;

/// Most rows one batch carries (the original's per-slice cap).
pub const MAX_BATCH: usize = UNPACK_MAX_SLICE_PAGES;

/// Errors of planning and unpacking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    /// A row reads or writes outside its buffers.
    #[error(
        "unpack row {index} (src {src}, dst {dst}, len {len}) is outside the \
         source ({src_len} bytes) or destination ({dst_len} bytes); the fragment \
         list does not belong to these buffers: drop the receive and close the connection"
    )]
    OutOfRange {
        /// Row index in the list.
        index: usize,
        /// Source offset.
        src: u64,
        /// Destination offset.
        dst: u64,
        /// Bytes.
        len: u32,
        /// Source bytes.
        src_len: usize,
        /// Destination bytes.
        dst_len: usize,
    },
    /// The fragments carry more bytes than the destination has room for.
    #[error(
        "a receive of {bytes} bytes does not fit the {room} bytes left in the \
         destination; post a larger buffer or receive less per call"
    )]
    TooLong {
        /// Bytes the fragments carry.
        bytes: u64,
        /// Room left.
        room: u64,
    },
    /// Linear fragments claim more bytes than recvmsg put in the iov.
    #[error(
        "linear fragments claim {claimed} bytes but the linear buffer holds \
         {have}; the control data does not match this recvmsg"
    )]
    LinearOverrun {
        /// Bytes claimed.
        claimed: u64,
        /// Bytes in the linear buffer.
        have: usize,
    },
    /// A device-side unpack failed.
    #[error("device unpack failed: {0}")]
    Device(String),
}

/// The gather lists of one or more receives into one destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatherPlan {
    /// Rows from the RX pool.
    pub pool: Vec<Frag>,
    /// Rows from the linear (iov) buffer.
    pub linear: Vec<Frag>,
    /// Tokens to give back once `pool` rows are unpacked.
    pub tokens: Vec<u32>,
    /// Bytes planned (pool and linear).
    pub bytes: u64,
}

impl GatherPlan {
    /// Empties the lists, keeping their capacity.
    pub fn clear(&mut self) {
        self.pool.clear();
        self.linear.clear();
        self.tokens.clear();
        self.bytes = 0;
    }
}

/// Appends to `plan` the rows for one receive's `frags`, whose bytes go to
/// `dst_start..` of a destination with `dst_len` bytes; linear fragments
/// read the linear buffer (`linear_len` bytes) in order from offset 0.
/// Returns the destination offset after the last byte. On error `plan` is
/// left as it was.
pub fn plan(
    frags: &[Fragment],
    linear_len: usize,
    dst_start: u64,
    dst_len: usize,
    plan: &mut GatherPlan,
) -> Result<u64, UnpackError> {
    let bytes: u64 = frags.iter().map(|f| u64::from(f.len())).sum();
    let room = (dst_len as u64).saturating_sub(dst_start);
    if bytes > room {
        return Err(UnpackError::TooLong { bytes, room });
    }
    let linear: u64 = frags
        .iter()
        .filter(|f| matches!(f, Fragment::Linear { .. }))
        .map(|f| u64::from(f.len()))
        .sum();
    if linear > linear_len as u64 {
        return Err(UnpackError::LinearOverrun {
            claimed: linear,
            have: linear_len,
        });
    }
    let (mut dst, mut lin) = (dst_start, 0u64);
    for f in frags {
        match *f {
            Fragment::Linear { len } if len > 0 => {
                plan.linear.push(Frag::new(lin, dst, len));
                lin += u64::from(len);
            }
            Fragment::Pool {
                offset, len, token, ..
            } => {
                if len > 0 {
                    plan.pool.push(Frag::new(offset, dst, len));
                }
                plan.tokens.push(token);
            }
            Fragment::Linear { .. } => {}
        }
        dst += u64::from(f.len());
    }
    plan.bytes += bytes;
    Ok(dst)
}

/// Checks every row of `frags` against the source and destination sizes.
pub fn check(frags: &[Frag], src_len: usize, dst_len: usize) -> Result<(), UnpackError> {
    for (index, f) in frags.iter().enumerate() {
        let fits = |off: u64, len: usize| {
            off.checked_add(u64::from(f.len))
                .is_some_and(|end| end <= len as u64)
        };
        if !(fits(f.src, src_len) && fits(f.dst, dst_len)) {
            return Err(UnpackError::OutOfRange {
                index,
                src: f.src,
                dst: f.dst,
                len: f.len,
                src_len,
                dst_len,
            });
        }
    }
    Ok(())
}

/// A gather engine: copies rows from a source (pool or linear buffer) to a
/// destination. Implemented on the CPU ([`CpuUnpack`]); the CUDA kernel
/// (`cuda::unpack::Unpacker`) fits the same shape with device buffers.
pub trait Unpack {
    /// The source buffer type.
    type Src: ?Sized;
    /// The destination buffer type.
    type Dst: ?Sized;

    /// Most rows one [`Unpack::unpack_batch`] takes.
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    /// Gathers at most [`Unpack::max_batch`] rows; checks every row first
    /// and copies nothing if one is out of range.
    fn unpack_batch(
        &mut self,
        src: &Self::Src,
        dst: &mut Self::Dst,
        frags: &[Frag],
    ) -> Result<(), UnpackError>;

    /// Gathers any number of rows, batch by batch. On error, batches before
    /// the failing one have been copied.
    fn unpack(
        &mut self,
        src: &Self::Src,
        dst: &mut Self::Dst,
        frags: &[Frag],
    ) -> Result<usize, UnpackError> {
        let n = self.max_batch().max(1);
        let mut batches = 0;
        for batch in frags.chunks(n) {
            self.unpack_batch(src, dst, batch)?;
            batches += 1;
        }
        Ok(batches)
    }
}

/// The CPU gather, for host-mapped pools (memfd, emulated NIC).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUnpack;

impl Unpack for CpuUnpack {
    type Src = [u8];
    type Dst = [u8];

    fn unpack_batch(
        &mut self,
        src: &[u8],
        dst: &mut [u8],
        frags: &[Frag],
    ) -> Result<(), UnpackError> {
        check(frags, src.len(), dst.len())?;
        for f in frags {
            // Checked above: both ranges are in bounds and fit usize.
            let (s, d, l) = (f.src as usize, f.dst as usize, f.len as usize);
            dst[d..d + l].copy_from_slice(&src[s..s + l]);
        }
        Ok(())
    }
}

/// The CUDA kernel behind the same trait: pool and destination in device
/// memory (a `DeviceBuffer`, or a GPU pool's mapping: `RxPool::device`),
/// rows staged through `scratch` (at least 16 bytes per row of a batch),
/// synchronous per batch.
#[derive(Debug)]
pub struct CudaUnpack<'a> {
    /// The compiled kernel.
    pub unpacker: &'a crate::cuda::unpack::Unpacker,
    /// Stream to launch on.
    pub stream: &'a crate::cuda::mem::Stream,
    /// Device scratch for the row list.
    pub scratch: &'a crate::cuda::mem::DeviceBuffer,
}

impl Unpack for CudaUnpack<'_> {
    type Src = dyn crate::cuda::mem::DeviceMem;
    type Dst = dyn crate::cuda::mem::DeviceMem;

    fn max_batch(&self) -> usize {
        (self.scratch.len() / std::mem::size_of::<Frag>()).min(MAX_BATCH)
    }

    fn unpack_batch(
        &mut self,
        src: &Self::Src,
        dst: &mut Self::Dst,
        frags: &[Frag],
    ) -> Result<(), UnpackError> {
        check(frags, src.device_len(), dst.device_len())?;
        self.unpacker
            .gather(self.stream, src, dst, frags, self.scratch)
            .map_err(|e| UnpackError::Device(e.to_string()))
    }
}

/// Host rows into device memory, one copy each: the linear fragments of a
/// receive whose destination is on the GPU (few, and at most a header each).
#[derive(Debug)]
pub struct HostToDeviceUnpack<'a> {
    /// Stream to copy on.
    pub stream: &'a crate::cuda::mem::Stream,
}

impl Unpack for HostToDeviceUnpack<'_> {
    type Src = [u8];
    type Dst = dyn crate::cuda::mem::DeviceMem;

    fn unpack_batch(
        &mut self,
        src: &[u8],
        dst: &mut Self::Dst,
        frags: &[Frag],
    ) -> Result<(), UnpackError> {
        check(frags, src.len(), dst.device_len())?;
        self.stream
            .write_rows(src, dst, frags)
            .map_err(|e| UnpackError::Device(e.to_string()))
    }
}

/// Device rows into host memory, one synchronous copy each: the pool
/// fragments of a GPU-pool receive whose destination is in host memory
/// (chunk headers; few and small).
#[derive(Debug)]
pub struct DeviceToHostUnpack<'a> {
    /// The context of the source memory.
    pub ctx: &'static crate::cuda::Context,
    /// The stream the source's bytes land on, if they are still landing
    /// ([`crate::pool::RxPool::rows_stream`]).
    pub after: Option<&'a crate::cuda::mem::Stream>,
}

impl Unpack for DeviceToHostUnpack<'_> {
    type Src = dyn crate::cuda::mem::DeviceMem;
    type Dst = [u8];

    fn unpack_batch(
        &mut self,
        src: &Self::Src,
        dst: &mut [u8],
        frags: &[Frag],
    ) -> Result<(), UnpackError> {
        check(frags, src.device_len(), dst.len())?;
        crate::cuda::mem::read_rows(self.ctx, self.after, src, dst, frags)
            .map_err(|e| UnpackError::Device(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::unpack::gather_cpu;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn batches_past_the_original_slice_cap() {
        let n = 3 * MAX_BATCH + 7;
        let src: Vec<u8> = (0..n * 3).map(|i| (i * 7 + 1) as u8).collect();
        // Reverse order, 3 bytes each: rows are independent of each other.
        let frags: Vec<Frag> = (0..n)
            .map(|i| Frag::new((i * 3) as u64, ((n - 1 - i) * 3) as u64, 3))
            .collect();
        let mut got = vec![0u8; n * 3];
        let mut want = vec![0u8; n * 3];
        assert_eq!(CpuUnpack.unpack(&src, &mut got, &frags), Ok(4));
        gather_cpu(&src, &mut want, &frags);
        assert_eq!(got, want);
    }

    #[test]
    fn out_of_range_rows_copy_nothing_in_their_batch() {
        let src = [1u8; 64];
        let mut dst = [0u8; 64];
        let frags = [Frag::new(0, 0, 8), Frag::new(60, 8, 8)];
        let e = CpuUnpack.unpack(&src, &mut dst, &frags).unwrap_err();
        assert!(matches!(e, UnpackError::OutOfRange { index: 1, .. }));
        assert_eq!(dst, [0u8; 64]);
        let huge = [Frag::new(u64::MAX, 0, 1)];
        assert!(CpuUnpack.unpack(&src, &mut dst, &huge).is_err());
        let huge = [Frag::new(0, u64::MAX - 1, 4)];
        assert!(CpuUnpack.unpack(&src, &mut dst, &huge).is_err());
    }

    #[test]
    fn plan_keeps_stream_order_across_linear_and_pool() {
        let frags = [
            Fragment::Linear { len: 3 },
            Fragment::Pool {
                offset: 4096,
                len: 5,
                token: 1,
                dmabuf_id: None,
            },
            Fragment::Linear { len: 2 },
            Fragment::Pool {
                offset: 0,
                len: 0,
                token: 9,
                dmabuf_id: None,
            },
        ];
        let mut p = GatherPlan::default();
        assert_eq!(plan(&frags, 5, 10, 20, &mut p), Ok(20));
        assert_eq!(p.linear, [Frag::new(0, 10, 3), Frag::new(3, 18, 2)]);
        assert_eq!(p.pool, [Frag::new(4096, 13, 5)]);
        assert_eq!(p.tokens, [1, 9]);
        assert_eq!(p.bytes, 10);
        let before = p.clone();
        assert!(matches!(
            plan(&frags, 5, 11, 20, &mut p),
            Err(UnpackError::TooLong { bytes: 10, room: 9 })
        ));
        assert!(matches!(
            plan(&frags, 4, 0, 20, &mut p),
            Err(UnpackError::LinearOverrun {
                claimed: 5,
                have: 4
            })
        ));
        assert_eq!(p, before);
    }

    #[test]
    fn random_unaligned_rows_match_the_reference() {
        let mut seed = 7;
        let src: Vec<u8> = (0..1 << 16).map(|_| lcg(&mut seed) as u8).collect();
        let mut frags = Vec::new();
        let mut dst_off = 0u64;
        for _ in 0..500 {
            let len = 1 + lcg(&mut seed) % 300;
            let s = lcg(&mut seed) % (src.len() as u64 - len);
            frags.push(Frag::new(s, dst_off, len as u32));
            dst_off += len;
        }
        let mut got = vec![0u8; dst_off as usize];
        let mut want = got.clone();
        CpuUnpack.unpack(&src, &mut got, &frags).unwrap();
        gather_cpu(&src, &mut want, &frags);
        assert_eq!(got, want);
    }
}
