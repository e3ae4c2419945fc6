//! Devmem on the GPU machine (`scripts/gpu-check.sh`):
//! - the legacy RX-pool import (`NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT=0`:
//!   a CUDA IPC handle in `nvdma-<pci>`, written by a second process that
//!   owns the pool, as the original expects of its daemon), for the kernel's
//!   devmem socket (this machine's kernel answers with linear bytes: they
//!   reach the CUDA region through the GPU gather's copy path) and for the
//!   emulated NIC (fragments in the pool, the CUDA unpack kernel);
//! - devmem TX from CUDA regions through the emulated NIC (it reads the
//!   region's memory as a NIC reads its DMA-BUF), both ABIs;
//! - what this machine's NICs answer to `bind-rx` / `bind-tx` probes that
//!   name no DMA-BUF (nothing is bound: the kernel checks the fd last).
//!
//! Without CUDA every test prints why and passes (CI has no GPU).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{child, pair, pattern, T};
use devmem::cuda::mem::DeviceBuffer;
use devmem::cuda::vmm::Mapping;
use devmem::cuda::{probe, Context};
use devmem::gpumemd::legacy::legacy_path;
use devmem::gpumemd::mock::{MockConfig, MockGpumemd};
use devmem::netlink::NetlinkError;
use devmem::sockabi::KernelAbi;
use tcpx::{Config, DataPath, DevmemMode, HostMemory, MemoryRegion, Net, PtrKind, RecvBuf};

const POOL: usize = 32 << 20;
const SIZES: [usize; 5] = [1, 65_537, (1 << 20) + 3, (3 << 20) + 17, (8 << 20) + 4095];

fn cuda() -> Option<&'static Context> {
    match probe().and_then(|_| Context::get(0)) {
        Ok(c) => Some(c),
        Err(e) => {
            println!("skipping: {e}");
            None
        }
    }
}

fn loopback() -> Config {
    Config::loopback(&["127.0.0.1", "127.0.0.2"]).unwrap()
}

/// A CUDA region on GPU 0 (region first: it is let go before its memory).
struct Cuda(MemoryRegion, DeviceBuffer);

fn cuda_region(net: &Net, len: usize) -> Cuda {
    // Small allocations share pages; TCPX registration needs a 4 KiB-aligned
    // base, which allocations of whole 2 MiB granules have.
    let buf = tcpx::cuda_alloc(0, len.next_multiple_of(2 << 20)).unwrap();
    // SAFETY: buf outlives the region (field order) and every request.
    let mr = unsafe { net.reg_mr_raw(buf.ptr() as *mut u8, len, PtrKind::Cuda) }.unwrap();
    Cuda(mr, buf)
}

/// Sends each size from host memory of `tx` into a CUDA region of `rx` at
/// an odd offset; checks every byte and that nothing around it was written.
fn into_cuda(tx: &Net, rx: &Net, seed: u64) -> u64 {
    let (send, recv) = pair(tx, rx);
    let mut total = 0;
    for (i, &n) in SIZES.iter().enumerate() {
        let mut m = HostMemory::zeroed(n).unwrap();
        pattern(seed + i as u64, &mut m);
        let want = m.to_vec();
        let src = tx.reg_mr(m);
        let off = 4097;
        let dst = cuda_region(rx, n + 2 * off);
        dst.1.fill(0x5A).unwrap();
        let tag = i as i32;
        let mut r = recv
            .irecv(&[RecvBuf {
                mr: &dst.0,
                offset: off,
                len: n,
                tag,
            }])
            .unwrap()
            .unwrap();
        send.isend(&src, 0, n, tag)
            .unwrap()
            .unwrap()
            .wait(T)
            .unwrap();
        assert_eq!(r.wait(T).unwrap()[0], n as u64);
        drop(r);
        let mut got = vec![0u8; n + 2 * off];
        dst.1.read(0, &mut got).unwrap();
        assert!(got[off..off + n] == want[..], "message {i} ({n} B) differs");
        assert!(
            got[..off].iter().chain(&got[off + n..]).all(|&b| b == 0x5A),
            "message {i}: bytes written outside it"
        );
        total += n as u64;
    }
    total
}

/// The process that owns the legacy pool: allocates it, writes its IPC
/// handle where the original looks (here a folder of the test's), serves
/// queue ids and rules for its GPU, and lives until the parent kills it.
#[test]
fn legacy_pool_owner() {
    let Some((role, Some(dir))) = child::role() else {
        return;
    };
    if role != "legacy-owner" {
        return;
    }
    let ctx = Context::get(0).unwrap();
    let pci = ctx.pci_bus_id().unwrap();
    let pool = Mapping::alloc(ctx, POOL).unwrap();
    std::fs::write(
        legacy_path(Path::new(&dir), &pci),
        pool.ipc_handle().unwrap(),
    )
    .unwrap();
    let mock = MockGpumemd::start_temp(MockConfig {
        gpu_pci: pci.clone(),
        ..MockConfig::default()
    })
    .unwrap();
    child::say(&format!("{}|{pci}", mock.prefix().display()));
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(pool);
}

#[test]
fn legacy_ipc_pool_receives_into_cuda_regions() {
    if child::role().is_some() || cuda().is_none() {
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("tcpx-nvdma-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut owner = Reaped(child::spawn(
        "legacy_pool_owner",
        "legacy-owner",
        Some(&dir.display().to_string()),
    ));
    let line = child::line(&mut owner.0);
    let (prefix, pci) = line.split_once('|').unwrap();
    for emulated in [None, Some(KernelAbi::Tcpx), Some(KernelAbi::Upstream)] {
        if let (None, Err(e)) = (emulated, devmem::sockabi::kernel_abi()) {
            println!("skipping the kernel's devmem socket: {e}");
            continue;
        }
        let mut c = loopback();
        c.gpumemd_prefix = Some(prefix.into());
        c.gpu_pci = Some(pci.into());
        c.devmem = DevmemMode::Require;
        c.rxmem_import = tcpx::RxmemImport::LegacyFile;
        c.rxmem_legacy_dir = dir.clone();
        c.devmem_emulated = emulated;
        let rx = Net::init(c).unwrap();
        let want = if emulated.is_some() {
            DataPath::DevmemEmulated
        } else {
            DataPath::Devmem
        };
        assert!(rx.devices().iter().all(|d| d.path == want));
        let tx = Net::init(loopback()).unwrap();
        let t = Instant::now();
        let bytes = into_cuda(&tx, &rx, 0x1E6A);
        let secs = t.elapsed().as_secs_f64();
        let st = rx.stats();
        match emulated {
            None => {
                // This kernel copies unsteered flows: linear bytes, gathered
                // into the CUDA region by copies from the linear buffer.
                assert!(st.devmem_linear_bytes >= bytes - 65_537 - 1, "{st:?}");
                assert_eq!(st.devmem_fragments, 0, "{st:?}");
            }
            Some(_) => {
                assert!(
                    st.devmem_fragments > 0 && st.devmem_unpack_kernels > 0,
                    "{st:?}"
                );
                assert_eq!(
                    st.devmem_tokens_returned, st.devmem_tokens_received,
                    "{st:?}"
                );
                assert_eq!(st.devmem_tokens_outstanding, 0, "{st:?}");
            }
        }
        println!(
            "byte-exact legacy IPC pool import ({}): {bytes} bytes into CUDA regions at odd offsets, \
             {:.2} GB/s; {st:?}",
            emulated.map_or("kernel devmem socket", |a| a.name()),
            bytes as f64 / secs / 1e9
        );
    }
    drop(owner);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pool's owner, killed when the test ends, passed or not.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn emulated_devmem_tx_from_cuda_regions() {
    if child::role().is_some() || cuda().is_none() {
        return;
    }
    for abi in KernelAbi::ALL {
        let mut c = loopback();
        c.devmem_emulated = Some(abi);
        let (a, b) = (Net::init(c.clone()).unwrap(), Net::init(c).unwrap());
        let (send, recv) = pair(&a, &b);
        let mut payload = 0;
        for (i, &n) in SIZES.iter().enumerate() {
            let mut want = vec![0u8; n];
            pattern(77 + i as u64, &mut want);
            let src = cuda_region(&a, n);
            src.1.write(0, &want).unwrap();
            let mut dst = b.reg_mr(HostMemory::zeroed(n).unwrap());
            let mut r = recv
                .irecv(&[RecvBuf {
                    mr: &dst,
                    offset: 0,
                    len: n,
                    tag: 3,
                }])
                .unwrap()
                .unwrap();
            send.isend(&src.0, 0, n, 3)
                .unwrap()
                .unwrap()
                .wait(T)
                .unwrap();
            assert_eq!(r.wait(T).unwrap()[0], n as u64);
            drop(r);
            assert!(dst.bytes().unwrap() == &want[..], "{abi:?} message {i}");
            if n > a.config().inline_threshold {
                payload += n as u64;
            }
        }
        let st = a.stats();
        assert!(st.devmem_tx_bytes >= payload, "{abi:?}: {st:?}");
        assert_eq!(
            st.devmem_tx_completed, st.devmem_tx_sends,
            "{abi:?}: {st:?}"
        );
        println!(
            "byte-exact devmem TX from CUDA regions ({}): {} sends, {} bytes, all completed",
            abi.name(),
            st.devmem_tx_sends,
            st.devmem_tx_bytes
        );
    }
}

/// What this machine's NICs say to a devmem bind that names no DMA-BUF
/// (fd -1, refused before anything is bound): printed, for the record, and
/// each answer one the transport reports as designed.
#[test]
fn this_machines_nics_answer_bind_probes() {
    if child::role().is_some() {
        return;
    }
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return println!("skipping: no /sys/class/net");
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "lo" {
            continue;
        }
        let d = Duration::from_secs(2);
        let rx = devmem::netlink::probe_bind(&name, Some(&[0]), d);
        let tx = devmem::netlink::probe_bind(&name, None, d);
        for r in [&rx, &tx] {
            match r {
                Ok(()) | Err(NetlinkError::PermissionDenied { .. } | NetlinkError::NoFamily) => {}
                Err(NetlinkError::NotSupported { ifname, .. }) => assert_eq!(ifname, &name),
                Err(e) => panic!("{name}: an answer the transport does not expect: {e}"),
            }
        }
        println!(
            "bind probe {name}: rx {} / tx {}",
            rx.map_or_else(|e| e.to_string(), |()| "passes".into()),
            tx.map_or_else(|e| e.to_string(), |()| "passes".into())
        );
    }
}
