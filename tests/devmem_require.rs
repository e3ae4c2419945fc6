//! `TCPX_DEVMEM=require`: init fails with a message naming the missing
//! piece, one test per cause, each checked by its `devmem::Cause` and the C
//! cause code (`tcpx_last_error_cause()`); under `prefer` the same setups
//! start on the host path.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::time::{Duration, Instant};

use common::child;
use devmem::gpumemd::mock::{Endpoint, Fault, MockConfig, MockGpumemd};
use devmem::Cause;
use tcpx::{Config, DataPath, DevmemMode, Net, NicSpec, RxmemImport};

fn gpumemd_at(prefix: &std::path::Path, mode: DevmemMode) -> Config {
    let mut c = Config::loopback(&["127.0.0.1"]).unwrap();
    c.gpumemd_prefix = Some(prefix.to_path_buf());
    c.gpu_pci = Some(MockConfig::default().gpu_pci);
    c.devmem = mode;
    c
}

fn upstream_on_lo(mode: DevmemMode) -> Config {
    Config {
        data_nics: vec![NicSpec::parse("lo").unwrap()],
        devmem_queues: vec![0, 1],
        devmem: mode,
        ..Config::default()
    }
}

/// Init under `require` fails with `cause` and a message holding `names`;
/// the same config under `prefer` starts on the host path.
fn refused(cfg: Config, cause: Cause, names: &[&str]) -> String {
    let mut prefer = cfg.clone();
    prefer.devmem = DevmemMode::Prefer;
    let err = match Net::init(cfg) {
        Err(e) => e,
        Ok(_) => panic!("init succeeded; expected {cause:?}"),
    };
    let msg = err.to_string();
    let tcpx::Error::Devmem(d) = &err else {
        panic!("untyped: {err:?}")
    };
    assert_eq!(d.cause(), cause, "{msg}");
    assert_ne!(err.cause_code(), tcpx::ffi::TCPX_CAUSE_NONE);
    for n in names {
        assert!(msg.contains(n), "{n:?} not in: {msg}");
    }
    let net = Net::init(prefer).unwrap();
    assert!(net.devices().iter().all(|d| d.path == DataPath::Host));
    msg
}

#[test]
fn gpumemd_not_running() {
    let dir = std::env::temp_dir().join(format!("tcpx-no-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let msg = refused(
        gpumemd_at(&dir, DevmemMode::Require),
        Cause::GpumemdAbsent,
        &["queue_ids_by_gpu"],
    );
    eprintln!("{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpumemd_silent() {
    let mock = MockGpumemd::start_temp(
        MockConfig::default().with_fault(Fault::Hang, Some(Endpoint::QueueIds)),
    )
    .unwrap();
    let t = Instant::now();
    let msg = refused(
        gpumemd_at(mock.prefix(), DevmemMode::Require),
        Cause::GpumemdUnresponsive,
        &["queue-id query", "within"],
    );
    // Two inits (require, prefer), one client deadline each.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    eprintln!("{msg}");
}

#[test]
fn nic_without_the_queue_api() {
    let msg = refused(
        upstream_on_lo(DevmemMode::Require),
        Cause::NicUnsupported,
        &["NIC lo", "devmem RX", "queue API"],
    );
    eprintln!("{msg}");
}

/// The kernel refuses `bind-rx` to a process without CAP_NET_ADMIN: a child
/// of this test drops root (all capabilities) and tries.
#[test]
fn bind_rx_refused_without_cap_net_admin() {
    if let Some((role, _)) = child::role() {
        if role == "no-admin" {
            // SAFETY: setgid/setuid have no memory preconditions; the child
            // runs nothing else.
            let dropped = unsafe { libc::setgid(65534) == 0 && libc::setuid(65534) == 0 };
            assert!(dropped, "{}", std::io::Error::last_os_error());
            let e = Net::init(upstream_on_lo(DevmemMode::Require))
                .err()
                .expect("bind-rx without CAP_NET_ADMIN");
            let cause = match &e {
                tcpx::Error::Devmem(d) => format!("{:?}", d.cause()),
                _ => "untyped".into(),
            };
            child::say(&format!("{cause}|{e}"));
        }
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let answer = if root {
        let mut c = child::spawn("bind_rx_refused_without_cap_net_admin", "no-admin", None);
        let l = child::line(&mut c);
        let _ = c.wait();
        l
    } else {
        // Already without the capability: this process is the test.
        let e = Net::init(upstream_on_lo(DevmemMode::Require))
            .err()
            .unwrap();
        match &e {
            tcpx::Error::Devmem(d) => format!("{:?}|{e}", d.cause()),
            _ => format!("untyped|{e}"),
        }
    };
    eprintln!("bind-rx without CAP_NET_ADMIN: {answer}");
    let (cause, msg) = answer.split_once('|').unwrap();
    assert_eq!(cause, "PermissionDenied", "{msg}");
    assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
}

/// gpumemd hands out GPU memory (a pool fd that is no memory file) and
/// this process cannot import it: no CUDA here, or (on a GPU machine) a
/// handle CUDA refuses.
#[test]
fn no_cuda_for_a_gpu_pool() {
    let not_a_file = std::fs::File::open("/dev/null").unwrap();
    // On a GPU machine the pool names this machine's GPU, so that the
    // import itself is what CUDA refuses (not the lookup of a GPU that
    // is not here).
    let gpu = devmem::cuda::available()
        .then(|| {
            devmem::cuda::Context::get(0)
                .and_then(|c| c.pci_bus_id())
                .ok()
        })
        .flatten();
    let gpu_pci = gpu.clone().unwrap_or(MockConfig::default().gpu_pci);
    let mock = MockGpumemd::start_temp_with_pool(
        MockConfig {
            pool_size: 4 << 20,
            gpu_pci: gpu_pci.clone(),
            ..MockConfig::default()
        },
        not_a_file.into(),
    )
    .unwrap();
    let cause = if gpu.is_some() {
        Cause::CudaFailed
    } else {
        Cause::CudaUnavailable
    };
    let mut cfg = gpumemd_at(mock.prefix(), DevmemMode::Require);
    cfg.gpu_pci = Some(gpu_pci);
    let msg = refused(cfg, cause, &["GPU RX pool"]);
    eprintln!("{msg}");
}

#[test]
fn pool_import_failed() {
    // gpumemd's fd is a pipe, not memory.
    let mock = MockGpumemd::start_temp(
        MockConfig::default().with_fault(Fault::WrongFdKind, Some(Endpoint::GpuFd)),
    )
    .unwrap();
    let msg = refused(
        gpumemd_at(mock.prefix(), DevmemMode::Require),
        Cause::PoolFdBad,
        &["pipe"],
    );
    eprintln!("{msg}");
    // The legacy import (NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT=0) with
    // no handle file, then a short one: the original skips or exits there.
    let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("tcpx-nvdma-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = gpumemd_at(mock.prefix(), DevmemMode::Require);
    c.rxmem_import = RxmemImport::LegacyFile;
    c.rxmem_legacy_dir = dir.clone();
    let pci = MockConfig::default().gpu_pci;
    let path = format!("nvdma-{pci}");
    let msg = refused(c.clone(), Cause::PoolFdBad, &[&path, "No such file"]);
    eprintln!("{msg}");
    std::fs::write(dir.join(&path), [1u8; 20]).unwrap();
    let msg = refused(c, Cause::PoolFdBad, &[&path, "20 bytes"]);
    eprintln!("{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}
