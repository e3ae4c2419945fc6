//! GPU figures for the CUDA paths, one table: pinned D2H, loopback TCP with
//! host memory, the bounce path GPU->GPU (same loopback), and the unpack
//! kernel against a device-to-device copy of the same bytes. Exits 0 with a
//! note when no GPU is present.

use std::time::{Duration, Instant};

use devmem::cuda::mem::{time_on, DeviceBuffer, PinnedBuffer, Stream};
use devmem::cuda::unpack::{Frag, Unpacker};
use devmem::cuda::{probe, Context};
use tcpx::{Config, HostMemory, MemoryRegion, Net, PtrKind, RecvBuf};

const T: Duration = Duration::from_secs(60);

fn main() {
    if let Err(e) = probe() {
        println!("SKIP no GPU: {e}");
        return;
    }
    if let Err(e) = run() {
        eprintln!("tcpx-gpu-bench: {e}");
        std::process::exit(1);
    }
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = Context::get(0)?;
    let stream = Stream::new(ctx)?;
    const BIG: usize = 256 << 20;
    let dev = DeviceBuffer::alloc(ctx, BIG)?;
    dev.fill(3)?;
    let pinned = PinnedBuffer::alloc(ctx, BIG)?;
    let mut best = f32::MAX;
    for _ in 0..5 {
        // SAFETY: pinned and dev hold BIG bytes; time_on syncs.
        best = best.min(time_on(&stream, |s| unsafe {
            s.dtoh(pinned.as_ptr(), dev.ptr(), BIG)
        })?);
    }
    println!(
        "ROW d2h_pinned_256MiB | {:.1} GB/s",
        gbps(BIG, best as f64 / 1e3)
    );

    // Loopback TCP with host memory against the CUDA bounce path, same
    // config and sizes, interleaved (best of 3 each) so that drift in the
    // machine's load hits both; once per workers-per-NIC setting.
    const MSG: usize = 64 << 20;
    const N: usize = 16;
    let gs = DeviceBuffer::alloc(ctx, MSG)?;
    let gd = DeviceBuffer::alloc(ctx, MSG)?;
    let mut x = 0x2545F4914F6CDD1Du64;
    let want: Vec<u8> = (0..MSG)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    gs.write(0, &want)?;
    // Host messages use the default chunk; CUDA ones `cuda_chunk_size`.
    for (workers, chunk) in [(1, 2 << 20), (2, 512 << 10), (2, 1 << 20), (2, 2 << 20)] {
        let mut cfg = Config::loopback(&["127.0.0.1", "127.0.0.2"])?;
        cfg.workers_per_nic = workers;
        cfg.cuda_chunk_size = chunk;
        let a = Net::init(cfg.clone())?;
        let b = Net::init(cfg)?;
        let (send, recv) = pair(&a, &b)?;
        // The host source holds the same bytes as the GPU one: an untouched
        // mapping would be read from the kernel's shared zero page, always in
        // cache, and flatter the baseline.
        let hs = a.reg_mr(HostMemory::from_slice(&want)?);
        let hd = b.reg_mr(HostMemory::zeroed(MSG)?);
        // SAFETY: the device buffers outlive the regions and requests.
        let ms = unsafe { a.reg_mr_raw(gs.ptr() as *mut u8, MSG, PtrKind::Cuda)? };
        let md = unsafe { b.reg_mr_raw(gd.ptr() as *mut u8, MSG, PtrKind::Cuda)? };
        let (mut host, mut bounce, mut tx_only, mut rx_only) = (0f64, 0f64, 0f64, 0f64);
        for _ in 0..3 {
            host = host.max(transfer(&send, &recv, &hs, &hd, MSG, N)?);
            gd.fill(0)?;
            bounce = bounce.max(transfer(&send, &recv, &ms, &md, MSG, N)?);
            let mut got = vec![0u8; MSG];
            gd.read(0, &mut got)?;
            if got != want {
                return Err("bounce bench: received bytes are wrong".into());
            }
            // Which side costs: GPU only on the sender, then only on the receiver.
            tx_only = tx_only.max(transfer(&send, &recv, &ms, &hd, MSG, N)?);
            rx_only = rx_only.max(transfer(&send, &recv, &hs, &md, MSG, N)?);
        }
        let tag = format!("64MiBx{N}_w{workers}_cudachunk{}K", chunk >> 10);
        println!("ROW loopback_tcp_host_{tag} | {host:.2} GB/s");
        println!(
            "ROW bounce_gpu_to_gpu_{tag} | {bounce:.2} GB/s (byte-exact; {:.2}x host TCP)",
            bounce / host
        );
        println!(
            "ROW bounce_gpu_to_host_{tag} | {tx_only:.2} GB/s ({:.2}x host TCP)",
            tx_only / host
        );
        println!(
            "ROW bounce_host_to_gpu_{tag} | {rx_only:.2} GB/s ({:.2}x host TCP)",
            rx_only / host
        );
    }

    // Where the bounce path's time goes: one small copy + event round trip
    // (its per-chunk CUDA cost), and host TCP between pinned buffers (the
    // CPU's cost of touching staging memory).
    let ev = devmem::cuda::mem::Event::new(ctx)?;
    let small = PinnedBuffer::alloc(ctx, 4096)?;
    let t = Instant::now();
    const CALLS: u32 = 2000;
    for _ in 0..CALLS {
        // SAFETY: 4 KiB pinned and device bytes; synced before the next.
        unsafe { stream.dtoh(small.as_ptr(), dev.ptr(), 4096)? };
        ev.record(&stream)?;
        ev.sync()?;
    }
    println!(
        "ROW cuda_copy_event_roundtrip_4KiB | {:.1} us per copy+record+sync",
        t.elapsed().as_secs_f64() * 1e6 / CALLS as f64
    );
    {
        let cfg = Config::loopback(&["127.0.0.1", "127.0.0.2"])?;
        let workers = cfg.workers_per_nic;
        let a = Net::init(cfg.clone())?;
        let b = Net::init(cfg)?;
        let (send, recv) = pair(&a, &b)?;
        let (ps, pd) = (
            PinnedBuffer::alloc(ctx, MSG)?,
            PinnedBuffer::alloc(ctx, MSG)?,
        );
        // SAFETY: ps holds MSG bytes and nothing else uses it yet.
        unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), ps.as_ptr(), MSG) };
        // SAFETY: the pinned buffers outlive the regions and requests.
        let ms = unsafe { a.reg_mr_raw(ps.as_ptr(), MSG, PtrKind::Host)? };
        let md = unsafe { b.reg_mr_raw(pd.as_ptr(), MSG, PtrKind::Host)? };
        let hs = a.reg_mr(HostMemory::from_slice(&want)?);
        let hd = b.reg_mr(HostMemory::zeroed(MSG)?);
        let (mut plain, mut pinned) = (0f64, 0f64);
        for _ in 0..3 {
            plain = plain.max(transfer(&send, &recv, &hs, &hd, MSG, N)?);
            pinned = pinned.max(transfer(&send, &recv, &ms, &md, MSG, N)?);
        }
        println!(
            "ROW loopback_tcp_pinned_host_64MiBx{N}_w{workers} | {pinned:.2} GB/s ({:.2}x plain host memory, {plain:.2} GB/s)",
            pinned / plain
        );
    }

    // Unpack: 4 KiB fragments scattered in a pool, gathered in order.
    let un = Unpacker::new(ctx)?;
    const FRAG: usize = 4096;
    let n = BIG / FRAG;
    let pool = DeviceBuffer::alloc(ctx, BIG)?;
    pool.fill(9)?;
    let out = DeviceBuffer::alloc(ctx, BIG)?;
    let mut x = 0x9E3779B97F4A7C15u64;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let frags: Vec<Frag> = (0..n)
        .map(|i| Frag::new((order[i] * FRAG) as u64, (i * FRAG) as u64, FRAG as u32))
        .collect();
    Unpacker::check(&frags, BIG, BIG)?;
    let scratch = DeviceBuffer::alloc(ctx, n * std::mem::size_of::<Frag>())?;
    // SAFETY: Frag is plain repr(C) data.
    let raw = unsafe { std::slice::from_raw_parts(frags.as_ptr().cast::<u8>(), scratch.len()) };
    scratch.write(0, raw)?;
    let (mut tk, mut tc) = (f32::MAX, f32::MAX);
    for _ in 0..10 {
        // SAFETY: fragments checked above; buffers outlive the syncs.
        tk = tk.min(time_on(&stream, |s| unsafe {
            un.launch(s, pool.ptr(), out.ptr(), scratch.ptr(), n as u32)
        })?);
        // SAFETY: both buffers hold BIG bytes.
        tc = tc.min(time_on(&stream, |s| unsafe {
            s.dtod(out.ptr(), pool.ptr(), BIG)
        })?);
    }
    let (k, c) = (gbps(BIG, tk as f64 / 1e3), gbps(BIG, tc as f64 / 1e3));
    println!("ROW unpack_4KiB_frags_256MiB | {k:.0} GB/s (bytes moved once)");
    println!(
        "ROW d2d_copy_256MiB | {c:.0} GB/s ; unpack/d2d = {:.0}%",
        100.0 * k / c
    );
    let mut probe_bytes = vec![0u8; FRAG];
    out.read(12345 * FRAG, &mut probe_bytes)?;
    if probe_bytes.iter().any(|&v| v != 9) {
        return Err("unpack bench: output bytes are wrong".into());
    }
    Ok(())
}

fn pair(a: &Net, b: &Net) -> tcpx::Result<(tcpx::SendComm, tcpx::RecvComm)> {
    let (h, mut l) = b.listen(0)?;
    let mut h = tcpx::Handle::from_bytes(&h.to_bytes())?;
    std::thread::scope(|s| {
        let acc = s.spawn(move || l.accept_wait(T));
        let send = a.connect_wait(0, &mut h, T)?;
        let recv = acc.join().map_err(|_| tcpx::Error::Closed)??;
        Ok((send, recv))
    })
}

/// GB/s of `n` messages of `len` bytes, one in flight each way at a time after a warm-up.
fn transfer(
    send: &tcpx::SendComm,
    recv: &tcpx::RecvComm,
    src: &MemoryRegion,
    dst: &MemoryRegion,
    len: usize,
    n: usize,
) -> tcpx::Result<f64> {
    let mut t = Instant::now();
    for i in 0..=n {
        if i == 1 {
            t = Instant::now(); // first message is warm-up
        }
        let bufs = [RecvBuf {
            mr: dst,
            offset: 0,
            len,
            tag: 1,
        }];
        let mut rx = recv.irecv(&bufs)?.ok_or(tcpx::Error::Busy)?;
        let mut tx = send.isend(src, 0, len, 1)?.ok_or(tcpx::Error::Busy)?;
        tx.wait(T)?;
        rx.wait(T)?;
    }
    Ok(gbps(len * n, t.elapsed().as_secs_f64()))
}
