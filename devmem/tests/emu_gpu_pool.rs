//! Emulated-devmem RX into a real GPU pool imported from the mock gpumemd,
//! byte-exact, with its GB/s (issue #6).
//!
//! The mock serves a GPU pool (`GpuPoolServer` over an `ExportedPool`); a
//! client in a second process imports it through the real `get_gpu_fd_<pci>` and
//! `get_gpu_metadata_<pci>` calls; a TCP sender streams random messages of
//! odd sizes to an emulated devmem socket receiving into that pool; the
//! receiver gathers the fragments into a device buffer with `CudaUnpack`
//! (linear ones by host-to-device copies), returns tokens by dontneed and
//! checks each message byte for byte. The same flow with a host pool and
//! `CpuUnpack` runs alongside for reference. Without CUDA it prints why and
//! passes (CI has no GPU).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use common::xorshift;

use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use devmem::cuda::mem::{pointer_kind, DeviceBuffer, MemKind};
use devmem::cuda::unpack::{Frag, Unpacker};
use devmem::cuda::{probe, vmm, Context};
use devmem::emu::{EmuConfig, EmuDevmemSocket};
use devmem::gpumemd::GpumemdClient;
use devmem::pool::{RxPool, PAGE_SIZE};
use devmem::sockabi::{control_buffer_len, parse_rx, release_tokens, DevmemSocket, KernelAbi};
use devmem::unpack::{
    plan, CpuUnpack, CudaUnpack, GatherPlan, HostToDeviceUnpack, Unpack, MAX_BATCH,
};

const PCI: &str = "0000:00:00.0";
const POOL_BYTES: usize = 8 << 20;
const MESSAGES: usize = 6;
const MAX_MSG: usize = 48 << 20;

/// Odd message sizes and their random bytes, back to back.
fn messages(seed: u64) -> (Vec<usize>, Arc<Vec<u8>>) {
    let mut rnd = xorshift(seed);
    let sizes: Vec<usize> = (0..MESSAGES)
        .map(|_| (1 + rnd() as usize % MAX_MSG) | 1)
        .collect();
    let total = sizes.iter().sum();
    let mut data = Vec::with_capacity(total + 8);
    while data.len() < total {
        data.extend_from_slice(&rnd().to_le_bytes());
    }
    data.truncate(total);
    (sizes, Arc::new(data))
}

/// A connected pair: the receiving end, and the thread writing `data` to it.
fn stream(data: Arc<Vec<u8>>) -> (TcpStream, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let tx = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&data).unwrap();
    });
    (l.accept().unwrap().0, tx)
}

/// Where one flow's messages are unpacked.
trait Sink {
    /// Poisons the destination for a message of `len` bytes.
    fn start(&mut self, len: usize);
    /// Gathers one receive's rows.
    fn unpack(&mut self, pool: &RxPool, linear: &[u8], plan: &GatherPlan);
    /// Asserts the message is `want`.
    fn check(&mut self, want: &[u8], index: usize);
}

struct GpuSink<'a> {
    unpacker: &'a Unpacker,
    scratch: &'a DeviceBuffer,
    dst: DeviceBuffer,
    got: Vec<u8>,
}

impl Sink for GpuSink<'_> {
    fn start(&mut self, _len: usize) {
        self.dst.fill(0xEE).unwrap();
    }

    fn unpack(&mut self, pool: &RxPool, linear: &[u8], plan: &GatherPlan) {
        let gpu_pool = pool.device().expect("a GPU pool");
        // The emulated NIC's bytes reach the GPU on the pool's stream.
        let stream = pool
            .readers_stream()
            .unwrap()
            .expect("an emulated GPU pool");
        let mut cu = CudaUnpack {
            unpacker: self.unpacker,
            stream,
            scratch: self.scratch,
        };
        cu.unpack(gpu_pool, &mut self.dst, &plan.pool).unwrap();
        HostToDeviceUnpack { stream }
            .unpack(linear, &mut self.dst, &plan.linear)
            .unwrap();
    }

    fn check(&mut self, want: &[u8], index: usize) {
        self.got.resize(want.len(), 0);
        self.dst.read(0, &mut self.got).unwrap();
        assert!(
            self.got == want,
            "GPU message {index} ({} bytes) differs from what was sent",
            want.len()
        );
    }
}

struct HostSink(Vec<u8>);

impl Sink for HostSink {
    fn start(&mut self, len: usize) {
        self.0.clear();
        self.0.resize(len, 0xEE);
    }

    fn unpack(&mut self, pool: &RxPool, linear: &[u8], plan: &GatherPlan) {
        let host = pool.host().expect("a host pool");
        CpuUnpack.unpack(host, &mut self.0, &plan.pool).unwrap();
        CpuUnpack.unpack(linear, &mut self.0, &plan.linear).unwrap();
    }

    fn check(&mut self, want: &[u8], index: usize) {
        assert!(self.0 == want, "host message {index} differs");
    }
}

/// What one flow moved.
struct Flow {
    bytes: u64,
    /// Receive + unpack + dontneed, verification excluded.
    busy: Duration,
    linear_frags: u64,
    pool_frags: u64,
}

impl Flow {
    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.busy.as_secs_f64() / 1e9
    }
}

/// Receives every message through an emulated devmem socket on `pool`,
/// unpacking into `sink` and checking each message.
fn receive(abi: KernelAbi, pool: RxPool, sink: &mut dyn Sink, seed: u64) -> Flow {
    let (sizes, data) = messages(seed);
    let (rx, tx) = stream(data.clone());
    let mut emu = EmuDevmemSocket::new(rx, pool, EmuConfig::new(abi).with_seed(seed)).unwrap();
    let mut linear = vec![0u8; 256 << 10];
    let mut control = vec![0u8; control_buffer_len(64)];
    let mut gp = GatherPlan::default();
    let (mut start, mut busy) = (0usize, Duration::ZERO);
    for (index, &len) in sizes.iter().enumerate() {
        sink.start(len);
        let t = Instant::now();
        let mut at = 0u64;
        while (at as usize) < len {
            let lim = (len - at as usize).min(linear.len());
            let o = match emu.recv_devmem(&mut linear[..lim], &mut control) {
                Ok(o) => o,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("{abi:?} recv: {e}"),
            };
            assert!(o.bytes > 0, "stream ended inside message {index}");
            let frags = parse_rx(abi, &control[..o.control_len], o.bytes, o.msg_flags).unwrap();
            gp.clear();
            at = plan(&frags, lim, at, len, &mut gp).unwrap();
            sink.unpack(emu.pool(), &linear, &gp);
            release_tokens(&mut emu, &gp.tokens).unwrap();
        }
        busy += t.elapsed();
        sink.check(&data[start..start + len], index);
        start += len;
    }
    tx.join().unwrap();
    let s = emu.stats();
    assert!(
        emu.pool().outstanding().is_empty(),
        "{abi:?}: every token came back"
    );
    assert_eq!(emu.pool().free_pages(), emu.pool().len() / PAGE_SIZE);
    Flow {
        bytes: start as u64,
        busy,
        linear_frags: s.linear_frags,
        pool_frags: s.pool_frags,
    }
}

const CHILD_ENV: &str = "TCPX_EMU_GPU_POOL_CHILD";

/// The client process: imports the pool the parent's mock serves under the
/// prefix in `CHILD_ENV` and receives into it. Run by the test below.
#[test]
fn importer_child() {
    let Ok(prefix) = std::env::var(CHILD_ENV) else {
        return; // only meaningful as the child
    };
    let ctx = Context::get(0).unwrap();
    let client = GpumemdClient::new(prefix, Duration::from_secs(5));
    let unpacker = Unpacker::new(ctx).unwrap();
    let scratch = DeviceBuffer::alloc(ctx, MAX_BATCH * std::mem::size_of::<Frag>()).unwrap();
    let mut gpu = GpuSink {
        unpacker: &unpacker,
        scratch: &scratch,
        dst: DeviceBuffer::alloc(ctx, MAX_MSG).unwrap(),
        got: Vec::new(),
    };
    let mut host = HostSink(Vec::new());
    for (i, abi) in KernelAbi::ALL.into_iter().enumerate() {
        // A fresh import per flow, as a new connection's client would do.
        let fd = client.rx_pool_fd(PCI).unwrap();
        let md = client.rx_pool_metadata(PCI).unwrap();
        let mapping =
            vmm::import_pool(ctx, fd.as_fd(), md.size as usize, md.align as usize).unwrap();
        assert_eq!(
            pointer_kind(mapping.ptr()).unwrap(),
            MemKind::Device { ordinal: 0 },
            "the imported pool is GPU memory"
        );
        let pool_bytes = mapping.size();
        let seed = 0x6000 + i as u64;
        let g = receive(abi, RxPool::gpu(mapping).unwrap(), &mut gpu, seed);
        assert!(
            g.pool_frags > 0 && g.linear_frags > 0,
            "{abi:?}: both kinds of fragments"
        );
        let h = receive(abi, RxPool::local(pool_bytes).unwrap(), &mut host, seed);
        assert_eq!(g.bytes, h.bytes);
        println!(
            "byte-exact {}: {} bytes in {MESSAGES} odd-sized messages, emulated devmem RX into a \
             {pool_bytes}-byte GPU pool imported from the mock gpumemd + CudaUnpack: {:.2} GB/s \
             (same flow, host pool + CpuUnpack: {:.2} GB/s)",
            abi.name(),
            g.bytes,
            g.gbps(),
            h.gbps()
        );
    }
}

/// The daemon process: exports a GPU pool through the mock and runs the
/// client as a second process, as tcpgpudmarxd and the plugin are.
#[test]
fn emulated_devmem_rx_into_an_imported_gpu_pool_is_byte_exact() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let ctx = match probe().and_then(|_| Context::get(0)) {
        Ok(c) => c,
        Err(e) => return println!("skipping: {e}"),
    };
    let exported = vmm::ExportedPool::create(ctx, POOL_BYTES).unwrap();
    let text = common::run_importer_child(exported, PCI, "importer_child", CHILD_ENV, |d| {
        d.display().to_string()
    });
    // The harness may print "test importer_child ... " ahead of a figure.
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.find("byte-exact").map(|i| &l[i..]))
        .collect();
    assert_eq!(
        lines.len(),
        KernelAbi::ALL.len(),
        "one figure per ABI: {text}"
    );
    for l in lines {
        println!("{l}");
    }
}
