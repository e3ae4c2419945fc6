//! The `Unpack` trait on the CUDA kernel: batching past the scratch size,
//! byte-equal to the CPU unpack. Without a driver or device it prints why
//! and passes (CI has no GPU).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use devmem::cuda::mem::{DeviceBuffer, Stream};
use devmem::cuda::unpack::{Frag, Unpacker};
use devmem::cuda::{probe, Context};
use devmem::unpack::{CpuUnpack, CudaUnpack, Unpack, MAX_BATCH};

#[test]
fn cuda_unpack_batches_like_the_cpu_one() {
    let ctx = match probe().and_then(|_| Context::get(0)) {
        Ok(c) => c,
        Err(e) => return eprintln!("skipping: {e}"),
    };
    let unpacker = Unpacker::new(ctx).unwrap();
    let stream = Stream::new(ctx).unwrap();
    let mut x = 0x1234_5678_u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pool_h: Vec<u8> = (0..1 << 22).map(|_| rnd() as u8).collect();
    // More rows than one batch; unaligned sources and lengths.
    let n = 2 * MAX_BATCH + 123;
    let mut frags = Vec::with_capacity(n);
    let mut dst = 0u64;
    for _ in 0..n {
        let len = 1 + rnd() % 4096;
        let src = rnd() % (pool_h.len() as u64 - len);
        frags.push(Frag::new(src, dst, len as u32));
        dst += len;
    }
    let pool = DeviceBuffer::alloc(ctx, pool_h.len()).unwrap();
    pool.write(0, &pool_h).unwrap();
    let mut out = DeviceBuffer::alloc(ctx, dst as usize).unwrap();
    let scratch = DeviceBuffer::alloc(ctx, MAX_BATCH * std::mem::size_of::<Frag>()).unwrap();
    let mut gpu = CudaUnpack {
        unpacker: &unpacker,
        stream: &stream,
        scratch: &scratch,
    };
    assert_eq!(gpu.max_batch(), MAX_BATCH);
    assert_eq!(gpu.unpack(&pool, &mut out, &frags), Ok(3));
    let mut got = vec![0u8; dst as usize];
    out.read(0, &mut got).unwrap();
    let mut want = vec![0u8; dst as usize];
    CpuUnpack.unpack(&pool_h, &mut want, &frags).unwrap();
    assert!(got == want, "GPU unpack differs from the CPU unpack");
}
