//! GPU figures for the CUDA paths, one table: pinned D2H, loopback TCP with
//! host memory, the bounce path GPU->GPU (same loopback; in one process,
//! and between two processes), the unpack kernel against a
//! device-to-device copy of the same bytes, and batched copies (the NIXL
//! plugin's pack gather) by each method. `tcpx-gpu-bench mid` runs only the
//! one-at-a-time rows and the copy costs. Exits 0 with a note when no GPU
//! is present.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devmem::cuda::batch::{self, CopyList, Method};
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
    if std::env::args().nth(1).as_deref() == Some(RECEIVER_ARG) {
        if let Err(e) = receiver() {
            eprintln!("tcpx-gpu-bench receiver: {e}");
            std::process::exit(1);
        }
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
    // config and sizes, interleaved (ROUNDS pairs) so that drift in the
    // machine's load hits both; once per workers-per-NIC setting.
    const MSG: usize = TWO_PROC_MSG;
    const N: usize = 16;
    let gs = DeviceBuffer::alloc(ctx, MSG)?;
    let gd = DeviceBuffer::alloc(ctx, MSG)?;
    let want = pattern(MSG);
    gs.write(0, &want)?;
    // Host messages use the default chunk; CUDA ones `cuda_chunk_size`.
    // `tcpx-gpu-bench mid`: only the one-at-a-time rows and the copy costs.
    let mid = std::env::args().nth(1).as_deref() == Some("mid");
    let streaming = if mid {
        &[][..]
    } else {
        &[(1, 2 << 20), (2, 512 << 10), (2, 1 << 20), (2, 2 << 20)][..]
    };
    for &(workers, chunk) in streaming {
        let mut cfg = Config::loopback(&["127.0.0.1", "127.0.0.2"])?;
        cfg.workers_per_nic = workers;
        cfg.cuda_chunk_size = chunk;
        let l = Loopback::new(cfg, &gs, &gd, &want)?;
        let (send, recv, hs, hd, ms, md) = (&l.send, &l.recv, &l.hs, &l.hd, &l.ms, &l.md);
        let (mut host, mut bounce, mut tx_only, mut rx_only) = (0f64, 0f64, 0f64, 0f64);
        // Each round's bounce / host ratio: pairs measured back to back see
        // the same machine, so their median is steadier than best against best.
        let mut ratios = Vec::new();
        for _ in 0..ROUNDS {
            let h = transfer(send, recv, hs, hd, MSG, N)?;
            gd.fill(0)?;
            let b = transfer(send, recv, ms, md, MSG, N)?;
            ratios.push(b / h);
            host = host.max(h);
            bounce = bounce.max(b);
            let mut got = vec![0u8; MSG];
            gd.read(0, &mut got)?;
            if got != want {
                return Err("bounce bench: received bytes are wrong".into());
            }
            // Which side costs: GPU only on the sender, then only on the receiver.
            tx_only = tx_only.max(transfer(send, recv, ms, hd, MSG, N)?);
            rx_only = rx_only.max(transfer(send, recv, hs, md, MSG, N)?);
        }
        let tag = format!("64MiBx{N}_w{workers}_cudachunk{}K", chunk >> 10);
        println!("ROW loopback_tcp_host_{tag} | {host:.2} GB/s");
        let mid = median(&mut ratios);
        println!(
            "ROW bounce_gpu_to_gpu_{tag} | {bounce:.2} GB/s (byte-exact; best {:.2}x best host TCP; per round median {:.2}x, {:.2}..{:.2}x)",
            bounce / host,
            mid,
            ratios[0],
            ratios[ratios.len() - 1]
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

    if !mid {
        two_processes(&gs, &want)?;
    }

    // Mid-size messages one at a time (latency-bound, as small NIXL
    // transfers are), default config; in `mid` mode also with CUDA chunks
    // of 256 KiB (several per socket, so less copying left at either end).
    let chunks: &[usize] = if mid { &[0, 256 << 10] } else { &[0] };
    for &cuda_chunk in chunks {
        let mut cfg = Config::loopback(&["127.0.0.1", "127.0.0.2"])?;
        let tag = if cuda_chunk == 0 {
            String::new()
        } else {
            cfg.cuda_chunk_size = cuda_chunk;
            format!("_cudachunk{}K", cuda_chunk >> 10)
        };
        let l = Loopback::new(cfg, &gs, &gd, &want)?;
        let (send, recv, hs, hd, ms, md) = (&l.send, &l.recv, &l.hs, &l.hd, &l.ms, &l.md);
        for len in [256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20] {
            // Per round, against host TCP: GPU both sides, then one side only.
            let (mut ratios, mut tx_only, mut rx_only) = (Vec::new(), Vec::new(), Vec::new());
            let (mut host, mut bounce) = (0f64, 0f64);
            for _ in 0..ROUNDS {
                let h = transfer(send, recv, hs, hd, len, 64)?;
                let g = transfer(send, recv, ms, md, len, 64)?;
                tx_only.push(transfer(send, recv, ms, hd, len, 64)? / h);
                rx_only.push(transfer(send, recv, hs, md, len, 64)? / h);
                ratios.push(g / h);
                host = host.max(h);
                bounce = bounce.max(g);
            }
            println!(
                "ROW bounce_gpu_to_gpu_{}KiBx64_one_at_a_time{tag} | {bounce:.2} GB/s (host TCP {host:.2}; per round median {:.2}x; GPU sender only {:.2}x, GPU receiver only {:.2}x)",
                len >> 10,
                median(&mut ratios),
                median(&mut tx_only),
                median(&mut rx_only)
            );
        }
    }

    // Where the bounce path's time goes: one small copy + event round trip
    // (its per-chunk CUDA cost), and host TCP between pinned buffers (the
    // CPU's cost of touching staging memory).
    copy_roundtrips(ctx, &stream, &dev)?;
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
        // SAFETY: ps outlives the region and its requests.
        let ms = unsafe { a.reg_mr_raw(ps.as_ptr(), MSG, PtrKind::Host)? };
        // SAFETY: pd outlives the region and its requests.
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
    batched_gather(ctx, &stream, &pool, &out)
}

/// A NIXL pack's gather: `n` blocks of `len` bytes, every other one of a
/// buffer, into one contiguous pack, queued and waited for as the plugin
/// does; per method, the median of 200 batches.
fn batched_gather(
    ctx: &'static Context,
    stream: &Stream,
    src: &DeviceBuffer,
    pack: &DeviceBuffer,
) -> BoxResult<()> {
    let mut methods = vec![Method::Kernel, Method::Each];
    if batch::driver_available() {
        methods.insert(0, Method::Driver);
    }
    let mut list = CopyList::new(ctx)?;
    for (n, len) in [(128usize, 8usize << 10), (256, 64 << 10), (4, 1 << 20)] {
        let mut cells = Vec::new();
        for &how in &methods {
            list.clear();
            for i in 0..n {
                list.push(
                    pack.ptr() + (i * len) as u64,
                    src.ptr() + (2 * i * len) as u64,
                    len,
                );
            }
            let mut t = Vec::with_capacity(200);
            for _ in 0..200 {
                let start = Instant::now();
                // SAFETY: 2n blocks of len fit both 256 MiB buffers, which
                // outlive the call; the pack's blocks do not overlap.
                unsafe { list.run(stream, how, T)? };
                t.push(start.elapsed().as_secs_f64() * 1e6);
            }
            let us = median(&mut t);
            cells.push(format!(
                "{how:?} {us:.1} us ({:.2} us/descriptor, {:.0} GB/s)",
                us / n as f64,
                (n * len) as f64 / us / 1e3
            ));
        }
        println!(
            "ROW batched_gather_{n}x{}KiB | {}",
            len >> 10,
            cells.join("; ")
        );
    }
    Ok(())
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const RECEIVER_ARG: &str = "--bounce-receiver";
/// Interleaved host / bounce pairs per comparison.
const ROUNDS: usize = 5;
/// Messages per batch in the two-process comparison (after one warm-up).
const BATCH: usize = 16;
const TWO_PROC_MSG: usize = 64 << 20;
const TAG_BATCH: i32 = 7;
const TAG_DATA: i32 = 8;
const TAG_ACK: i32 = 9;

/// The bytes every GPU source holds (the receiver regenerates them to check).
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545F4914F6CDD1Du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn handle_hex(h: &tcpx::Handle) -> String {
    h.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_handle(line: &str) -> BoxResult<tcpx::Handle> {
    let line = line.trim();
    if line.len() % 2 != 0 || !line.is_ascii() {
        return Err(format!("not a hex handle: {line:?}").into());
    }
    let bytes = (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&line[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(tcpx::Handle::from_bytes(&bytes)?)
}

/// GPU->GPU over the bounce path against host->host, between this process
/// (sender) and a child (receiver, its own CUDA context), default config,
/// batches interleaved; the receiver times each batch and checks the GPU bytes.
fn two_processes(gs: &DeviceBuffer, want: &[u8]) -> BoxResult<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg(RECEIVER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let outcome = drive_receiver(&mut child, gs, want);
    if let Err(e) = outcome {
        // The receiver may have died first: say how, it is the cause.
        std::thread::sleep(Duration::from_millis(200));
        let ended = child.try_wait().ok().flatten();
        let _ = child.kill();
        let _ = child.wait();
        return Err(match ended {
            Some(status) => format!("{e} (the receiver process had ended: {status})").into(),
            None => e,
        });
    }
    let _ = child.wait();
    Ok(())
}

fn drive_receiver(
    child: &mut std::process::Child,
    gs: &DeviceBuffer,
    want: &[u8],
) -> BoxResult<()> {
    let cfg = Config::loopback(&["127.0.0.1", "127.0.0.2"])?;
    let net = Net::init(cfg)?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("child stdout")?).lines();
    let theirs = lines.next().ok_or("receiver exited before its handle")??;
    let mut h = parse_handle(&theirs)?;
    let (mine, mut listener) = net.listen(0)?;
    writeln!(
        child.stdin.as_mut().ok_or("child stdin")?,
        "{}",
        handle_hex(&mine)
    )?;
    let send = net.connect_wait(0, &mut h, T)?;
    let acks = listener.accept_wait(T)?;
    let hs = net.reg_mr(HostMemory::from_slice(want)?);
    // SAFETY: the device buffer outlives the region and its requests.
    let ms = unsafe { net.reg_mr_raw(gs.ptr() as *mut u8, TWO_PROC_MSG, PtrKind::Cuda)? };
    let mut ack = net.reg_mr(HostMemory::zeroed(16)?);
    let (mut ratios, mut best) = (Vec::new(), [0f64; 2]);
    for _ in 0..ROUNDS {
        let mut got = [0f64; 2];
        for (k, src) in [&hs, &ms].into_iter().enumerate() {
            let mut c = HostMemory::zeroed(16)?;
            c[0] = k as u8;
            let ctlk = net.reg_mr(c);
            send.isend(&ctlk, 0, 16, TAG_BATCH)?
                .ok_or(tcpx::Error::Busy)?
                .wait(T)?;
            let mut inflight = std::collections::VecDeque::new();
            for _ in 0..=BATCH {
                if inflight.len() == 4 {
                    let mut r: tcpx::Request = inflight.pop_front().ok_or("empty")?;
                    r.wait(T)?;
                }
                inflight.push_back(
                    send.isend(src, 0, TWO_PROC_MSG, TAG_DATA)?
                        .ok_or(tcpx::Error::Busy)?,
                );
            }
            for mut r in inflight {
                r.wait(T)?;
            }
            let buf = [RecvBuf {
                mr: &ack,
                offset: 0,
                len: 16,
                tag: TAG_ACK,
            }];
            acks.irecv(&buf)?.ok_or(tcpx::Error::Busy)?.wait(T)?;
            let b = ack.bytes()?;
            if b[8] != 1 {
                return Err("two-process bench: the receiver saw wrong bytes".into());
            }
            got[k] = f64::from_le_bytes(b[..8].try_into()?);
            best[k] = best[k].max(got[k]);
        }
        ratios.push(got[1] / got[0]);
    }
    let mid = median(&mut ratios);
    println!(
        "ROW two_processes_loopback_tcp_host_64MiBx{BATCH} | {:.2} GB/s",
        best[0]
    );
    println!(
        "ROW two_processes_bounce_gpu_to_gpu_64MiBx{BATCH} | {:.2} GB/s (byte-exact; per round median {:.2}x host TCP, {:.2}..{:.2}x)",
        best[1],
        mid,
        ratios[0],
        ratios[ratios.len() - 1]
    );
    Ok(())
}

/// The child: receives batches into host or GPU memory, answers with the GB/s.
fn receiver() -> BoxResult<()> {
    let ctx = Context::get(0)?;
    let net = Net::init(Config::loopback(&["127.0.0.1", "127.0.0.2"])?)?;
    let (mine, mut listener) = net.listen(0)?;
    println!("{}", handle_hex(&mine));
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let mut theirs = parse_handle(&line)?;
    let recv = listener.accept_wait(T)?;
    let acks = net.connect_wait(0, &mut theirs, T)?;
    let want = pattern(TWO_PROC_MSG);
    let gd = DeviceBuffer::alloc(ctx, TWO_PROC_MSG)?;
    let hd = net.reg_mr(HostMemory::zeroed(TWO_PROC_MSG)?);
    // SAFETY: the device buffer outlives the region and its requests.
    let md = unsafe { net.reg_mr_raw(gd.ptr() as *mut u8, TWO_PROC_MSG, PtrKind::Cuda)? };
    let mut ctl = net.reg_mr(HostMemory::zeroed(16)?);
    for _ in 0..2 * ROUNDS {
        let buf = [RecvBuf {
            mr: &ctl,
            offset: 0,
            len: 16,
            tag: TAG_BATCH,
        }];
        recv.irecv(&buf)?.ok_or(tcpx::Error::Busy)?.wait(T)?;
        let gpu = ctl.bytes()?[0] == 1;
        let dst = if gpu { &md } else { &hd };
        if gpu {
            gd.fill(0)?;
        }
        let mut t = Instant::now();
        let mut inflight = std::collections::VecDeque::new();
        for i in 0..=BATCH {
            let buf = [RecvBuf {
                mr: dst,
                offset: 0,
                len: TWO_PROC_MSG,
                tag: TAG_DATA,
            }];
            inflight.push_back(recv.irecv(&buf)?.ok_or(tcpx::Error::Busy)?);
            if i == 0 {
                // The warm-up message is not timed.
                let mut r: tcpx::Request = inflight.pop_front().ok_or("empty")?;
                r.wait(T)?;
                t = Instant::now();
            } else if inflight.len() == 4 {
                let mut r: tcpx::Request = inflight.pop_front().ok_or("empty")?;
                r.wait(T)?;
            }
        }
        for mut r in inflight {
            r.wait(T)?;
        }
        let rate = gbps(TWO_PROC_MSG * BATCH, t.elapsed().as_secs_f64());
        let exact = if gpu {
            let mut got = vec![0u8; TWO_PROC_MSG];
            gd.read(0, &mut got)?;
            got == want
        } else {
            true
        };
        let mut a = HostMemory::zeroed(16)?;
        a[..8].copy_from_slice(&rate.to_le_bytes());
        a[8] = exact as u8;
        let a = net.reg_mr(a);
        acks.isend(&a, 0, 16, TAG_ACK)?
            .ok_or(tcpx::Error::Busy)?
            .wait(T)?;
    }
    Ok(())
}

/// Two Nets in this process, connected, each with a host and a GPU region
/// of the same size (`gs`/`gd` must outlive it).
struct Loopback {
    send: tcpx::SendComm,
    recv: tcpx::RecvComm,
    hs: MemoryRegion,
    hd: MemoryRegion,
    ms: MemoryRegion,
    md: MemoryRegion,
    _nets: (Net, Net),
}

impl Loopback {
    fn new(cfg: Config, gs: &DeviceBuffer, gd: &DeviceBuffer, want: &[u8]) -> tcpx::Result<Self> {
        let a = Net::init(cfg.clone())?;
        let b = Net::init(cfg)?;
        let (send, recv) = pair(&a, &b)?;
        // The host source holds the same bytes as the GPU one: an untouched
        // mapping would be read from the kernel's shared zero page, always in
        // cache, and flatter the baseline.
        let hs = a.reg_mr(HostMemory::from_slice(want)?);
        let hd = b.reg_mr(HostMemory::zeroed(want.len())?);
        // SAFETY: the caller keeps the device buffers alive longer than this.
        let ms = unsafe { a.reg_mr_raw(gs.ptr() as *mut u8, want.len(), PtrKind::Cuda)? };
        // SAFETY: as above.
        let md = unsafe { b.reg_mr_raw(gd.ptr() as *mut u8, want.len(), PtrKind::Cuda)? };
        Ok(Loopback {
            send,
            recv,
            hs,
            hd,
            ms,
            md,
            _nets: (a, b),
        })
    }
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

/// GB/s of `n` messages of `len` bytes, one in flight each way at a time
/// after a warm-up. Successive messages use successive parts of the
/// regions, as real traffic does: the same bytes resent would stay in the
/// CPU's cache and flatter host memory against staging the GPU fills.
fn transfer(
    send: &tcpx::SendComm,
    recv: &tcpx::RecvComm,
    src: &MemoryRegion,
    dst: &MemoryRegion,
    len: usize,
    n: usize,
) -> tcpx::Result<f64> {
    let parts = (src.len().min(dst.len()) / len.max(1)).max(1);
    let mut t = Instant::now();
    for i in 0..=n {
        if i == 1 {
            t = Instant::now(); // first message is warm-up
        }
        let at = (i % parts) * len;
        let bufs = [RecvBuf {
            mr: dst,
            offset: at,
            len,
            tag: 1,
        }];
        let mut rx = recv.irecv(&bufs)?.ok_or(tcpx::Error::Busy)?;
        let mut tx = send.isend(src, at, len, 1)?.ok_or(tcpx::Error::Busy)?;
        tx.wait(T)?;
        rx.wait(T)?;
    }
    Ok(gbps(len * n, t.elapsed().as_secs_f64()))
}

/// One copy plus its event, recorded and waited for as the bounce path
/// does (spins, then naps): alone, and with three more threads doing the
/// same at once on their own streams, as the workers of four data sockets
/// do (the copy engine serves them one after another).
fn copy_roundtrips(
    ctx: &'static Context,
    stream: &Stream,
    dev: &DeviceBuffer,
) -> Result<(), Box<dyn std::error::Error>> {
    use devmem::cuda::mem::Event;
    // µs per D2H and per H2D copy+record+wait of `len` bytes at `off` of `dev`.
    let roundtrip = |stream: &Stream, len: usize, off: u64, calls: usize| {
        let ev = Event::new(ctx)?;
        let staging = PinnedBuffer::alloc(ctx, len)?;
        let (mut d2h, mut h2d, mut submit) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..calls {
            let t = Instant::now();
            // SAFETY: `len` pinned and device bytes; waited for before the next.
            unsafe { stream.dtoh(staging.as_ptr(), dev.ptr() + off, len)? };
            ev.record(stream)?;
            submit += t.elapsed();
            ev.wait("bench copy", T)?;
            d2h += t.elapsed();
            let t = Instant::now();
            // SAFETY: as above.
            unsafe { stream.htod(dev.ptr() + off, staging.as_ptr(), len)? };
            ev.record(stream)?;
            ev.wait("bench copy", T)?;
            h2d += t.elapsed();
        }
        let us = |d: Duration| d.as_secs_f64() * 1e6 / calls as f64;
        Ok::<_, devmem::cuda::CudaError>((us(d2h), us(h2d), us(submit)))
    };
    for len in [4096, 512 << 10, 2 << 20] {
        let calls = if len == 4096 { 2000 } else { 200 };
        let (d2h, h2d, submit) = roundtrip(stream, len, 0, calls)?;
        println!(
            "ROW cuda_copy_event_roundtrip_{}KiB | D2H {d2h:.1} us, H2D {h2d:.1} us per copy+record+wait (D2H copy+record calls {submit:.1} us)",
            len >> 10
        );
    }
    let len = 512 << 10;
    let per_thread = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4u64)
            .map(|i| {
                sc.spawn(move || {
                    let s = Stream::new(ctx)?;
                    roundtrip(&s, len, i * (4 << 20), 200)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| "copy thread panicked".to_string()))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let (mut d2h, mut h2d, mut submit) = (0f64, 0f64, 0f64);
    for r in per_thread {
        let (d, h, c) = r?;
        d2h = d2h.max(d);
        h2d = h2d.max(h);
        submit = submit.max(c);
    }
    println!(
        "ROW cuda_copy_event_roundtrip_512KiB_4_threads | D2H {d2h:.1} us, H2D {h2d:.1} us per copy+record+wait, slowest thread (D2H copy+record calls {submit:.1} us)"
    );
    Ok(())
}

/// The median of `v`, which it leaves sorted.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
