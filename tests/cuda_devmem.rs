//! Emulated devmem RX into a GPU pool, through the transport (issue #6).
//!
//! This process exports two GPU pools and serves each with a mock gpumemd,
//! as tcpgpudmarxd does. A second process of this binary runs two `Net`s on
//! loopback with `devmem_emulated`, each importing its daemon's pool through
//! the real gpumemd calls. Random odd-sized messages, many in flight, both
//! directions at once, are received into CUDA regions at odd offsets: the
//! unpack kernel gathers every fragment from the pool straight into the
//! region. Each message is checked byte for byte (and its neighbours for
//! stray writes) by copying it back, and the flow's GB/s is printed next to
//! the same flow into host pools and host memory, each as a ratio to host
//! TCP run alternately with it. Sources are host memory in
//! both, so the figures differ only in the receive path. Without CUDA the
//! test prints why and passes (CI has no GPU).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::time::{Duration, Instant};

use devmem::cuda::mem::DeviceBuffer;
use devmem::cuda::vmm::ExportedPool;
use devmem::cuda::{probe, Context};
use devmem::gpumemd::mock::{MockConfig, MockGpumemd};
use devmem::sockabi::KernelAbi;
use rand::{Rng, SeedableRng};
use tcpx::{Config, DataPath, HostMemory, MemoryRegion, Net, PtrKind, RecvBuf};

const CHILD_ENV: &str = "TCPX_CUDA_DEVMEM_CHILD";
const T: Duration = Duration::from_secs(60);
/// Per daemon: 2 NICs x 2 sockets of one receive comm, 2 MiB each (the GPU
/// allocation granularity), with room to spare.
const POOL_BYTES: usize = 16 << 20;
/// Messages in flight per direction, and the largest.
const N: usize = 8;
const MAX_MSG: usize = 6 << 20;
const SLOT: usize = MAX_MSG + 4096;
/// Rounds per flow, the first untimed: it pays for first use (CUDA
/// allocations, the unpack kernel's first launch, TCP windows opening).
const ROUNDS: usize = 5;

fn config(prefix: &str, pci: &str, abi: KernelAbi) -> Config {
    let mut c = Config::loopback(&["127.0.0.1", "127.0.0.2"]).unwrap();
    c.gpumemd_prefix = Some(prefix.into());
    c.gpu_pci = Some(pci.into());
    c.devmem = tcpx::DevmemMode::Require;
    c.devmem_emulated = Some(abi);
    c.emu_pool_bytes = 2 << 20;
    c
}

/// Where one direction's messages land.
enum Dest {
    /// Region first: it is let go before the memory under it.
    Cuda(MemoryRegion, DeviceBuffer),
    Host(MemoryRegion),
}

impl Dest {
    fn new(net: &Net, cuda: bool) -> Dest {
        if !cuda {
            return Dest::Host(net.reg_mr(HostMemory::zeroed(SLOT * N).unwrap()));
        }
        let buf = tcpx::cuda_alloc(0, SLOT * N).unwrap();
        // SAFETY: buf outlives the region (field order) and every request.
        let mr = unsafe { net.reg_mr_raw(buf.ptr() as *mut u8, SLOT * N, PtrKind::Cuda) }.unwrap();
        Dest::Cuda(mr, buf)
    }

    fn mr(&self) -> &MemoryRegion {
        match self {
            Dest::Cuda(mr, _) | Dest::Host(mr) => mr,
        }
    }

    fn poison(&mut self) {
        match self {
            Dest::Cuda(_, buf) => buf.fill(0x5A).unwrap(),
            Dest::Host(mr) => mr.bytes_mut().unwrap().fill(0x5A),
        }
    }

    fn read(&mut self) -> Vec<u8> {
        match self {
            Dest::Cuda(_, buf) => {
                let mut v = vec![0u8; SLOT * N];
                buf.read(0, &mut v).unwrap();
                v
            }
            Dest::Host(mr) => mr.bytes().unwrap().to_vec(),
        }
    }
}

/// Rounds of `N` messages from `x` to `y`, all in flight at once; returns
/// the bytes moved and the time the transfers took (checks excluded).
fn one_direction(x: &Net, y: &Net, cuda: bool, seed: u64) -> (u64, Duration) {
    let (send, recv) = common::pair(x, y);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut src = HostMemory::zeroed(SLOT * N).unwrap();
    rng.fill(&mut src[..]);
    let want = src.to_vec();
    let src = x.reg_mr(src);
    let mut dst = Dest::new(y, cuda);
    let (mut bytes, mut busy) = (0u64, Duration::ZERO);
    for round in 0..ROUNDS {
        let sizes: Vec<usize> = (0..N)
            .map(|i| match (round, i) {
                (0, 0) => 1,
                (0, 1) => 65_537,
                _ => rng.gen_range(1..MAX_MSG) | 1,
            })
            .collect();
        let offs: Vec<usize> = (0..N).map(|_| rng.gen_range(0..4096) | 1).collect();
        dst.poison();
        let t = Instant::now();
        let mut reqs = Vec::new();
        for (i, (&n, &off)) in sizes.iter().zip(&offs).enumerate() {
            let tag = (round * N + i) as i32;
            let bufs = [RecvBuf {
                mr: dst.mr(),
                offset: i * SLOT + off,
                len: SLOT - off,
                tag,
            }];
            reqs.push((recv.irecv(&bufs).unwrap().expect("slot"), n));
            reqs.push((
                send.isend(&src, i * SLOT, n, tag).unwrap().expect("slot"),
                n,
            ));
        }
        for (mut r, n) in reqs {
            assert_eq!(r.wait(T).unwrap()[0] as usize, n);
        }
        if round > 0 {
            busy += t.elapsed();
            bytes += sizes.iter().sum::<usize>() as u64;
        }
        let got = dst.read();
        for (i, (&n, &off)) in sizes.iter().zip(&offs).enumerate() {
            let (s, at) = (i * SLOT, i * SLOT + off);
            assert!(
                got[at..at + n] == want[s..s + n],
                "round {round} message {i} ({n} B at +{off}, cuda {cuda}) differs"
            );
            assert!(
                got[s..at]
                    .iter()
                    .chain(&got[at + n..s + SLOT])
                    .all(|&v| v == 0x5A),
                "round {round} message {i}: bytes written outside it"
            );
        }
    }
    (bytes, busy)
}

/// Both directions at once; GB/s over the slower direction's time.
fn flow(a: &Net, b: &Net, cuda: bool, seed: u64) -> (u64, f64) {
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| one_direction(a, b, cuda, seed));
        let y = s.spawn(|| one_direction(b, a, cuda, seed + 1));
        (x.join().unwrap(), y.join().unwrap())
    });
    let bytes = x.0 + y.0;
    (bytes, bytes as f64 / x.1.max(y.1).as_secs_f64() / 1e9)
}

/// Flows of each kind run alternately, this many times: host TCP moves by
/// a factor of two from one second to the next on a shared machine, so the
/// figure is the median of the ratios of neighbouring runs.
const REPS: usize = 5;

/// `REPS` flows between `a` and `b`, each followed by one of host TCP:
/// their bytes, median GB/s, and median ratio to host TCP.
fn against_tcp(a: &Net, b: &Net, cuda: bool, plain: &[Net; 2]) -> (u64, f64, f64) {
    let (mut bytes, mut gbps, mut ratios) = (0, Vec::new(), Vec::new());
    for _ in 0..REPS {
        let (n, g) = flow(a, b, cuda, 0xD00D);
        let (_, tcp) = flow(&plain[0], &plain[1], false, 0xD00D);
        bytes = n;
        gbps.push(g);
        ratios.push(g / tcp);
    }
    (bytes, median(gbps), median(ratios))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The process holding the `Net`s: GPU pools from the parent's mocks into
/// CUDA regions, then memfd pools into host memory, same seeds, each
/// beside host TCP (host memory into host memory, no devmem at all).
#[test]
fn devmem_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // only meaningful as the child
    };
    let v: Vec<&str> = spec.split(',').collect();
    let [pa, pb, pci] = v[..] else {
        panic!("bad {CHILD_ENV}: {spec}")
    };
    let plain =
        [0, 1].map(|_| Net::init(Config::loopback(&["127.0.0.1", "127.0.0.2"]).unwrap()).unwrap());
    for abi in [KernelAbi::Tcpx, KernelAbi::Upstream] {
        let gpu = [pa, pb].map(|p| Net::init(config(p, pci, abi)).unwrap());
        assert!(gpu[0]
            .devices()
            .iter()
            .all(|d| d.path == DataPath::DevmemEmulated));
        let (bytes, gbps, ratio) = against_tcp(&gpu[0], &gpu[1], true, &plain);
        for n in &gpu {
            let st = n.stats();
            assert!(st.devmem_unpack_kernels > 0, "the kernel gathered: {st:?}");
            assert!(st.devmem_fragments > 0, "{st:?}");
            assert_eq!(
                st.devmem_tokens_returned, st.devmem_fragments,
                "every token back: {st:?}"
            );
        }
        drop(gpu);
        let mocks = [0, 1].map(|_| {
            MockGpumemd::start_temp(MockConfig {
                gpu_pci: pci.into(),
                pool_size: POOL_BYTES as u64,
                ..MockConfig::default()
            })
            .unwrap()
        });
        let host = mocks
            .each_ref()
            .map(|m| Net::init(config(&m.prefix().display().to_string(), pci, abi)).unwrap());
        let (hbytes, hgbps, hratio) = against_tcp(&host[0], &host[1], false, &plain);
        assert_eq!(bytes, hbytes, "the same messages");
        assert_eq!(host[0].stats().devmem_unpack_kernels, 0);
        println!(
            "byte-exact {}: {REPS} flows of {bytes} bytes timed, {} odd-sized messages each \
             ({N} in flight per direction, both directions, odd offsets; a first round \
             untimed), emulated devmem RX from a GPU pool imported from the mock gpumemd, CUDA \
             kernel into CUDA regions: median {gbps:.2} GB/s, {ratio:.2}x host TCP into host \
             memory run after each (same flow, host pool into host memory: {hgbps:.2} GB/s, \
             {hratio:.2}x)",
            abi.name(),
            2 * (ROUNDS - 1) * N,
        );
    }
}

#[test]
fn emulated_devmem_into_cuda_regions_through_a_gpu_pool_is_byte_exact() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let ctx = match probe().and_then(|_| Context::get(0)) {
        Ok(c) => c,
        Err(e) => return println!("skipping: {e}"),
    };
    let pci = ctx.pci_bus_id().unwrap();
    // The pools outlive the mocks serving them and the child using them.
    let pools = [0, 1].map(|_| ExportedPool::create(ctx, POOL_BYTES).unwrap());
    let mocks = pools.each_ref().map(|p| {
        MockGpumemd::start_temp_with_pool(
            MockConfig {
                gpu_pci: pci.clone(),
                pool_size: p.mapping.size() as u64,
                align: p.align as u64,
                ..MockConfig::default()
            },
            p.fd.try_clone().unwrap(),
        )
        .unwrap()
    });
    let spec = format!(
        "{},{},{pci}",
        mocks[0].prefix().display(),
        mocks[1].prefix().display()
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "devmem_child", "--nocapture"])
        .env(CHILD_ENV, spec)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.find("byte-exact").map(|i| &l[i..]))
        .collect();
    assert_eq!(lines.len(), 2, "one figure per ABI: {text}");
    for l in lines {
        println!("{l}");
    }
}
