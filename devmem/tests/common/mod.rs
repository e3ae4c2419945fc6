//! Shared by the GPU tests: the mock gpumemd serving a GPU pool while a
//! second process of the same test binary imports it, and seeded bytes.

use std::path::Path;

use devmem::cuda::vmm::ExportedPool;
use devmem::gpumemd::gpu_pool::GpuPoolServer;

/// Serves `pool` under a fresh prefix as GPU `pci`, runs test `child` of
/// this binary in a new process with `env` set to `value(prefix)`, and
/// returns the child's stdout once it passed (panics with its output if not).
pub fn run_importer_child(
    pool: ExportedPool,
    pci: &str,
    child: &str,
    env: &str,
    value: impl FnOnce(&Path) -> String,
) -> String {
    let dir = std::env::temp_dir().join(format!("tcpx-{child}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = GpuPoolServer::start(&dir, pci, pool).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--nocapture"])
        .env(env, value(&dir))
        .output()
        .unwrap();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{child} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A seeded xorshift generator: a failing run replays.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
