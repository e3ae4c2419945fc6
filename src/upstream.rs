//! Upstream devmem RX without gpumemd (Linux ≥ 6.12): per data NIC, a CUDA
//! allocation exported as a DMA-BUF and bound with netdev `bind-rx` to the
//! RX queues `TCPX_DEVMEM_QUEUES`; each accepted data socket's flow is
//! steered to one of those queues by an ethtool ntuple rule, removed when
//! its comm closes. The binding lives as long as the `Net` (binding
//! restarts the queues, so it is not done per comm) and is undone when the
//! `Net` goes (its netlink socket closes).
//!
//! The checks run cheapest first, so an error names the first missing
//! piece: the kernel's devmem ABI, the NIC (a bind request that names no
//! DMA-BUF, answered before any device memory exists), CUDA, the pool and
//! its DMA-BUF, then the bind itself (where header split is checked).

use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use devmem::cuda::mem::export_dmabuf;
use devmem::cuda::unpack::Unpacker;
use devmem::cuda::vmm::{MappedRange, Mapping};
use devmem::cuda::Context;
use devmem::netlink::{self, Binding};
use devmem::pool::RxPool;
use devmem::sockabi::{probe_abi, AbiError, KernelAbi};
use flowsteer::ethtool::EthtoolSteering;
use flowsteer::{FlowTuple, RuleHandle, Steering};

use crate::config::{Config, DevmemMode};
use crate::error::{Error, Result};
use crate::path::DevmemSpec;

/// How long the kernel may take to answer a netlink request.
const NETLINK_DEADLINE: Duration = Duration::from_secs(2);

/// One NIC's `bind-rx` binding, its pool and the steering to its queues.
pub(crate) struct UpstreamRx {
    memory: Arc<RxPool>,
    binding: Binding,
    _dmabuf: OwnedFd,
    steer: QueueSteer,
}

impl UpstreamRx {
    /// How this NIC's data sockets receive.
    pub fn spec(&self) -> DevmemSpec {
        DevmemSpec::Kernel {
            abi: KernelAbi::Upstream,
            memory: self.memory.clone(),
            dmabuf_id: Some(self.binding.dmabuf_id),
        }
    }

    pub fn queues(&self) -> &[u32] {
        &self.steer.queues
    }

    pub fn dmabuf_id(&self) -> u32 {
        self.binding.dmabuf_id
    }

    pub fn required(&self) -> bool {
        self.steer.require
    }

    /// Steers data socket `k`'s flow to a bound queue.
    pub fn steer(&self, s: &TcpStream, k: usize) -> Result<RuleHandle> {
        self.steer.steer(s, k)
    }
}

/// Flows to a NIC's bound RX queues, round-robin.
struct QueueSteer {
    steering: Arc<dyn Steering>,
    queues: Vec<u32>,
    ifname: String,
    require: bool,
}

impl QueueSteer {
    fn steer(&self, s: &TcpStream, k: usize) -> Result<RuleHandle> {
        let (local, peer) = match (s.local_addr(), s.peer_addr()) {
            (Ok(l), Ok(p)) => (l, p),
            (Err(e), _) | (_, Err(e)) => return Err(Error::io("getsockname", e)),
        };
        let tuple = FlowTuple::incoming(local, peer);
        let queue = self.queues[k % self.queues.len()];
        self.steering.install(tuple, queue).map_err(|e| {
            Error::Unsupported(format!(
                "steering {tuple} to RX queue {queue} of {}: {e}",
                self.ifname
            ))
        })
    }
}

/// Binds a DMA-BUF pool to `ifname`'s configured RX queues; see the module docs.
pub(crate) fn bind_rx(cfg: &Config, ifname: &str) -> Result<UpstreamRx> {
    if let Err(upstream) = probe_abi(KernelAbi::Upstream) {
        let tcpx = probe_abi(KernelAbi::Tcpx).err().unwrap_or_else(|| {
            std::io::Error::other("known, but TCPX kernels bind no DMA-BUF with bind-rx")
        });
        return Err(Error::devmem(AbiError::NoDevmemAbi {
            tcpx: tcpx.into(),
            upstream: upstream.into(),
        }));
    }
    let queues = &cfg.devmem_queues;
    netlink::probe_bind(ifname, Some(queues), NETLINK_DEADLINE).map_err(Error::devmem)?;
    let ctx = match &cfg.gpu_pci {
        Some(pci) => Context::by_pci(pci),
        None => Context::get(0),
    }
    .map_err(Error::devmem)?;
    Unpacker::shared(ctx).map_err(Error::devmem)?;
    let mapping = Mapping::alloc(ctx, cfg.devmem_pool_bytes).map_err(Error::devmem)?;
    let dmabuf = export_dmabuf(mapping.ptr(), mapping.size()).map_err(Error::devmem)?;
    let binding = netlink::bind_rx(ifname, dmabuf.as_raw_fd(), queues, NETLINK_DEADLINE)
        .map_err(Error::devmem)?;
    let memory = RxPool::device_only(MappedRange::from(mapping)).map_err(Error::devmem)?;
    let steering = EthtoolSteering::new(ifname)
        .map_err(|e| Error::Unsupported(format!("flow steering on {ifname}: {e}")))?;
    Ok(UpstreamRx {
        memory: Arc::new(memory),
        binding,
        _dmabuf: dmabuf,
        steer: QueueSteer {
            steering: Arc::new(steering),
            queues: queues.clone(),
            ifname: ifname.to_string(),
            require: cfg.devmem == DevmemMode::Require,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowsteer::RecordingSteering;

    #[test]
    fn flows_go_round_robin_to_the_bound_queues_and_rules_go_with_their_handles() {
        let rec = Arc::new(RecordingSteering::new());
        let s = QueueSteer {
            steering: rec.clone(),
            queues: vec![8, 9],
            ifname: "eth1".into(),
            require: false,
        };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conns: Vec<_> = (0..3)
            .map(|_| TcpStream::connect(l.local_addr().unwrap()).unwrap())
            .collect();
        let rules: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(k, c)| s.steer(c, k).unwrap())
            .collect();
        let queues: Vec<u32> = rec.active().iter().map(|r| r.queue).collect();
        assert_eq!(queues, [8, 9, 8]);
        // The rule matches the socket's incoming packets: peer -> local.
        let r = &rec.active()[0];
        assert_eq!(r.tuple.dst, conns[0].local_addr().unwrap());
        assert_eq!(r.tuple.src, conns[0].peer_addr().unwrap());
        drop(rules);
        assert!(rec.active().is_empty(), "rules removed with their handles");
        rec.fail_next_install(flowsteer::SteerError::NotSupported {
            ifname: "eth1".into(),
        });
        let e = s.steer(&conns[0], 0).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("RX queue 8 of eth1")),
            "{e}"
        );
    }
}
