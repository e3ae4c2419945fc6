//! The mock gpumemd's GPU mode: the RX pool is GPU memory exported as a
//! POSIX-fd shareable handle, served on the real `get_gpu_fd_<pci>` and
//! `get_gpu_metadata_<pci>` sockets as tcpgpudmarxd's
//! `CuIpcMemfdExporter` does (fd by SCM_RIGHTS; `{fd, size, align}` bytes).
//! A client imports it with [`crate::cuda::vmm::import_pool`].
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::conn::Conn;
use super::frame::PoolMetadata;
use super::proto::UnixSocketProto;
use super::{fd_socket_name, metadata_socket_name};
use crate::cuda::vmm::ExportedPool;

/// Serves one GPU pool until dropped.
pub struct GpuPoolServer {
    pool: Arc<ExportedPool>,
    paths: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl GpuPoolServer {
    /// Serves `pool` under `prefix` for the GPU `gpu_pci`.
    pub fn start(prefix: &Path, gpu_pci: &str, pool: ExportedPool) -> io::Result<Self> {
        let pool = Arc::new(pool);
        let stop = Arc::new(AtomicBool::new(false));
        let mut paths = Vec::new();
        let mut threads = Vec::new();
        for (name, is_fd) in [
            (fd_socket_name(gpu_pci), true),
            (metadata_socket_name(gpu_pci), false),
        ] {
            let path = prefix.join(name);
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)?;
            l.set_nonblocking(true)?;
            paths.push(path.clone());
            let (pool, stop, pci) = (pool.clone(), stop.clone(), gpu_pci.to_string());
            threads.push(std::thread::spawn(move || {
                serve(&l, &path, &pool, &stop, &pci, is_fd)
            }));
        }
        Ok(GpuPoolServer {
            pool,
            paths,
            stop,
            threads,
        })
    }

    pub fn pool(&self) -> &ExportedPool {
        &self.pool
    }
}

fn serve(
    l: &UnixListener,
    path: &Path,
    pool: &ExportedPool,
    stop: &AtomicBool,
    pci: &str,
    is_fd: bool,
) {
    while !stop.load(Ordering::Acquire) {
        let stream = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => return,
        };
        let _ = stream.set_nonblocking(false);
        let mut conn = Conn::from_stream(stream, path, "gpu pool", Duration::from_secs(2));
        let Ok(req) = conn.recv_proto() else { continue };
        if req.raw_bytes() != Some(pci.as_bytes()) {
            continue; // as the daemon: no answer for another GPU
        }
        let _ = if is_fd {
            conn.send_fds(&[pool.fd.as_fd()])
        } else {
            let md = PoolMetadata {
                daemon_fd: pool.fd.as_raw_fd(),
                size: pool.mapping.size() as u64,
                align: pool.align as u64,
            };
            conn.send_proto(&UnixSocketProto::raw(md.to_bytes().to_vec()))
        };
    }
}

impl Drop for GpuPoolServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
