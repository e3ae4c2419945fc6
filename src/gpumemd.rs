//! The devmem control plane through gpumemd: probe the daemon at init,
//! optionally register, and steer each accepted data socket's flow to one of
//! the GPU's RX queues for the comm's lifetime.
#![forbid(unsafe_code)]

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use devmem::cuda::vmm::{self, MappedRange, Mapping};
use devmem::cuda::Context;
use devmem::gpumemd::PoolMetadata;
use devmem::pool::RxPool;

use devmem::gpumemd::{GpumemdClient, GpumemdError, Registration, DEFAULT_DEADLINE};
use flowsteer::gpumemd::GpumemdSteering;
use flowsteer::{FlowTuple, RuleHandle, Steering};

use crate::config::{Config, DevmemMode};
use crate::error::{Error, Result};

/// Where an emulated devmem socket's RX pool comes from.
#[derive(Clone)]
pub(crate) enum PoolSource {
    /// Local memory of this many bytes per socket.
    Local(usize),
    /// A part of the pool gpumemd handed out.
    Shared(Arc<SharedPool>),
}

/// gpumemd's RX pool cut into equal parts, one per emulated devmem socket.
pub(crate) struct SharedPool {
    memory: PoolMemory,
    md: PoolMetadata,
    part: u64,
    used: Mutex<Vec<bool>>,
}

/// What gpumemd's pool fd is.
enum PoolMemory {
    /// A memory file (the mock on machines without a GPU): parts are mapped.
    Host(OwnedFd),
    /// A CUDA shareable handle, imported once into the GPU's context (as
    /// tcpgpudmarxd hands out); parts are ranges of that mapping.
    Gpu(Arc<Mapping>),
}

impl PoolMemory {
    /// A regular file is host memory; anything else that passed
    /// `check_pool_fd` is taken for a CUDA handle of GPU `pci`.
    fn import(fd: OwnedFd, md: &PoolMetadata, pci: &str) -> Result<Self> {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| {
            Error::devmem(GpumemdError::BadPoolFd {
                detail: format!("fstat failed: {e}"),
            })
        })?;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            return Ok(PoolMemory::Host(fd));
        }
        let gpu = |e: devmem::cuda::CudaError| {
            Error::Unsupported(format!(
                "gpumemd's RX pool for GPU {pci} is GPU memory, which this process cannot import ({e}); \
                 run where CUDA sees that GPU, or unset TCPX_DEVMEM_EMULATED"
            ))
        };
        let ctx = Context::by_pci(pci).map_err(gpu)?;
        let (size, align) = (md.size as usize, md.align as usize);
        let mapping = vmm::import_pool(ctx, fd.as_fd(), size, align).map_err(gpu)?;
        // Compiled once per GPU here, so that a missing NVRTC shows at init.
        devmem::cuda::unpack::Unpacker::shared(ctx).map_err(|e| {
            Error::Unsupported(format!(
                "gpumemd's RX pool for GPU {pci} is GPU memory, but the unpack kernel does not build ({e})"
            ))
        })?;
        tracing::info!(gpu = %pci, bytes = size, "gpumemd's RX pool is GPU memory: received fragments are unpacked by a CUDA kernel");
        Ok(PoolMemory::Gpu(Arc::new(mapping)))
    }
}

/// A part of the shared pool, given back when dropped.
pub(crate) struct PoolPart {
    pool: Arc<SharedPool>,
    index: usize,
}

impl SharedPool {
    /// Maps a free part; the pool is too small when all are taken.
    pub fn take(self: &Arc<Self>) -> Result<(RxPool, PoolPart)> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let Some(index) = used.iter().position(|u| !u) else {
            return Err(Error::Config(format!(
                "the RX pool ({} bytes) has no free {}-byte part left for another data socket; raise the pool or lower TCPX_EMU_POOL_BYTES",
                self.md.size, self.part
            )));
        };
        let offset = index as u64 * self.part;
        let rx = match &self.memory {
            PoolMemory::Host(fd) => RxPool::map_part(fd.as_fd(), &self.md, offset, self.part),
            PoolMemory::Gpu(m) => MappedRange::new(m.clone(), offset as usize, self.part as usize)
                .map_err(devmem::pool::PoolError::from)
                .and_then(RxPool::gpu),
        }
        .map_err(Error::devmem)?;
        used[index] = true;
        Ok((
            rx,
            PoolPart {
                pool: self.clone(),
                index,
            },
        ))
    }
}

impl Drop for PoolPart {
    fn drop(&mut self) {
        let mut used = self.pool.used.lock().unwrap_or_else(|p| p.into_inner());
        used[self.index] = false;
    }
}

pub(crate) struct Gpumemd {
    /// The daemon's RX pool, when the emulated devmem NIC receives into it.
    pub pool: Option<Arc<SharedPool>>,
    steering: GpumemdSteering,
    queue_ids: Vec<i32>,
    mode: DevmemMode,
    _registration: Option<Registration>,
}

impl Gpumemd {
    /// The daemon when configured and answering; `None` means the host path.
    pub fn connect(cfg: &Config) -> Result<Option<Self>> {
        let (Some(prefix), Some(pci)) = (&cfg.gpumemd_prefix, &cfg.gpu_pci) else {
            return Ok(None);
        };
        if cfg.devmem == DevmemMode::Off {
            return Ok(None);
        }
        let client = GpumemdClient::new(prefix, DEFAULT_DEADLINE);
        // The queue-id query has no side effects, unlike a registry connection.
        let queue_ids = match client.queue_ids(pci) {
            Ok(q) if !q.is_empty() => q,
            Ok(_) => {
                let path = prefix.clone();
                let detail = format!("no RX queues for GPU {pci}");
                return fallback(
                    cfg,
                    GpumemdError::InvalidReply {
                        op: "queue ids",
                        path,
                        detail,
                    },
                );
            }
            Err(e) => return fallback(cfg, e),
        };
        let pool = match cfg.devmem_emulated {
            Some(_) => {
                let p = client.rx_pool(pci).map_err(Error::devmem)?;
                let part = (cfg.emu_pool_bytes as u64).next_multiple_of(p.metadata.align.max(4096));
                let parts = (p.metadata.size / part) as usize;
                if parts == 0 {
                    return Err(Error::Config(format!(
                        "the RX pool ({} bytes) is smaller than one {part}-byte part (TCPX_EMU_POOL_BYTES)",
                        p.metadata.size
                    )));
                }
                Some(Arc::new(SharedPool {
                    memory: PoolMemory::import(p.fd, &p.metadata, pci)?,
                    md: p.metadata,
                    part,
                    used: Mutex::new(vec![false; parts]),
                }))
            }
            None => None,
        };
        let registration = if cfg.gpumemd_register {
            Some(client.register().map_err(Error::devmem)?)
        } else {
            None
        };
        tracing::info!(prefix = %prefix.display(), gpu = %pci, ?queue_ids, "gpumemd answers: devmem control plane on");
        Ok(Some(Gpumemd {
            pool,
            steering: GpumemdSteering::new(client, pci.clone()),
            queue_ids,
            mode: cfg.devmem,
            _registration: registration,
        }))
    }

    /// Steers the flows of accepted data sockets, one rule each, round-robin over the queues.
    /// Under `prefer`, a refused rule leaves the remaining flows unsteered (logged).
    pub fn steer(&self, socks: &[&TcpStream]) -> Result<Vec<RuleHandle>> {
        let mut out = Vec::with_capacity(socks.len());
        for (i, s) in socks.iter().enumerate() {
            let (local, peer) = match (s.local_addr(), s.peer_addr()) {
                (Ok(l), Ok(p)) => (l, p),
                (Err(e), _) | (_, Err(e)) => return Err(Error::io("getsockname", e)),
            };
            let queue = self.queue_ids[i % self.queue_ids.len()] as u32;
            match self
                .steering
                .install(FlowTuple::incoming(local, peer), queue)
            {
                Ok(f) => out.push(f),
                Err(e) if self.mode == DevmemMode::Require => {
                    return Err(Error::Gpumemd(e.to_string()))
                }
                Err(e) => {
                    tracing::warn!("gpumemd refused a flow-steering rule ({e}); this comm's remaining flows stay unsteered");
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// The host path under `prefer`; the daemon's error under `require`.
fn fallback(cfg: &Config, why: GpumemdError) -> Result<Option<Gpumemd>> {
    if cfg.devmem == DevmemMode::Require {
        tracing::error!("gpumemd unavailable and TCPX_DEVMEM=require: {why}");
        return Err(Error::devmem(why));
    }
    tracing::warn!("gpumemd unavailable ({why}); using the host path");
    Ok(None)
}
