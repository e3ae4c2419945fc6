//! The devmem control plane through gpumemd: probe the daemon at init,
//! optionally register, and steer each accepted data socket's flow to one of
//! the GPU's RX queues for the comm's lifetime.

use std::net::TcpStream;

use devmem::gpumemd::{GpumemdClient, Registration, DEFAULT_DEADLINE};
use flowsteer::gpumemd::GpumemdSteering;
use flowsteer::{FlowTuple, RuleHandle, Steering};

use crate::config::{Config, DevmemMode};
use crate::error::{Error, Result};

pub(crate) struct Gpumemd {
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
                return fallback(
                    cfg,
                    format!(
                        "gpumemd at {} has no RX queues for GPU {pci}",
                        prefix.display()
                    ),
                )
            }
            Err(e) => return fallback(cfg, e.to_string()),
        };
        let registration = if cfg.gpumemd_register {
            Some(
                client
                    .register()
                    .map_err(|e| Error::Gpumemd(e.to_string()))?,
            )
        } else {
            None
        };
        tracing::info!(prefix = %prefix.display(), gpu = %pci, ?queue_ids, "gpumemd answers: devmem control plane on");
        Ok(Some(Gpumemd {
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

fn fallback(cfg: &Config, why: String) -> Result<Option<Gpumemd>> {
    if cfg.devmem == DevmemMode::Require {
        return Err(Error::Gpumemd(format!("{why} (TCPX_DEVMEM=require)")));
    }
    tracing::warn!("gpumemd unavailable ({why}); using the host path");
    Ok(None)
}
