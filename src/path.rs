//! The data path of every NIC and region, decided in one place.
//!
//! At init, [`Paths::decide`] settles for each data NIC how payload is
//! received and how CUDA regions send, and logs one line per NIC:
//! - receive: kernel TCP into host memory, or a devmem socket per data
//!   socket ([`DevmemSpec`]): the kernel's, receiving into gpumemd's pool
//!   (TCPX kernels) or a DMA-BUF bound to RX queues with `bind-rx`
//!   (upstream kernels), or the emulated devmem NIC;
//! - send from CUDA memory: devmem TX from the region's DMA-BUF where the
//!   NIC can ([`TxDevmem`]: TCPX kernels, or upstream kernels whose NIC
//!   passes a `bind-tx` probe; or the emulated NIC), else bounce staging.
//!
//! Per chunk, [`rx_route`] says where a region's received bytes go (device
//! memory straight from a GPU pool, or host-addressable memory: the host
//! region itself or a CUDA region's staging); a region's devmem TX names
//! (`region_tx`) say whether its bytes leave by devmem TX.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devmem::cuda::mem::DeviceSpan;
use devmem::pool::RxPool;
use devmem::sockabi::KernelAbi;
use flowsteer::RuleHandle;

use crate::config::{Config, DevmemMode};
use crate::device::{DataPath, Device};
use crate::error::{Error, Result};
use crate::gpumemd::{Gpumemd, PoolSource};
use crate::memory::{Lane, Region};
use crate::upstream::UpstreamRx;

/// How a data socket of a devmem NIC receives.
#[derive(Clone)]
pub(crate) enum DevmemSpec {
    /// The kernel's devmem socket, receiving into the NIC's pool.
    Kernel {
        abi: KernelAbi,
        memory: Arc<RxPool>,
        /// Upstream: the id of the `bind-rx` binding fragments must carry.
        dmabuf_id: Option<u32>,
    },
    /// The emulated devmem NIC, receiving into a pool of its own.
    Emulated {
        abi: KernelAbi,
        source: PoolSource,
        /// Fill pages as their tokens come back (`TCPX_EMU_POISON`).
        poison: bool,
    },
}

impl DevmemSpec {
    pub fn abi(&self) -> KernelAbi {
        match self {
            DevmemSpec::Kernel { abi, .. } | DevmemSpec::Emulated { abi, .. } => *abi,
        }
    }
}

/// Devmem TX of one NIC: the kernel ABI its sends speak, through the
/// kernel or the emulated NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TxDevmem {
    pub abi: KernelAbi,
    pub emulated: bool,
}

/// What one NIC does.
pub(crate) struct NicPath {
    pub rx: Option<DevmemSpec>,
    pub tx: Option<TxDevmem>,
    /// Why a NIC probed for devmem TX has none.
    tx_why: Option<String>,
    pub reported: DataPath,
    /// Interface name, and its PCI address where sysfs has one.
    pub name: String,
    pub pci: Option<String>,
    /// The `bind-rx` binding and its steering, upstream.
    upstream: Option<UpstreamRx>,
}

/// Every NIC's path, and what keeps the devmem ones working (gpumemd's
/// registration and steering, upstream bindings) for the `Net`'s life.
pub(crate) struct Paths {
    pub nics: Vec<NicPath>,
    gpumemd: Option<Gpumemd>,
}

impl Paths {
    /// Decides every NIC's path and logs it, one line per NIC. Under
    /// `TCPX_DEVMEM=require` a missing piece fails here, named.
    pub fn decide(cfg: &Config, devices: &[Device]) -> Result<Self> {
        let gpumemd = Gpumemd::connect(cfg)?;
        let mut nics = Vec::with_capacity(devices.len());
        for d in devices {
            let mut upstream = None;
            let rx = if let Some(abi) = cfg.devmem_emulated {
                let source = gpumemd
                    .as_ref()
                    .and_then(|g| g.shared_pool())
                    .map_or(PoolSource::Local(cfg.emu_pool_bytes), PoolSource::Shared);
                Some(DevmemSpec::Emulated {
                    abi,
                    source,
                    poison: cfg.emu_poison,
                })
            } else if let Some(g) = &gpumemd {
                g.kernel_spec()
            } else if !cfg.devmem_queues.is_empty() && cfg.devmem != DevmemMode::Off {
                match crate::upstream::bind_rx(cfg, &d.name) {
                    Ok(u) => {
                        let spec = u.spec();
                        upstream = Some(u);
                        Some(spec)
                    }
                    Err(e) if cfg.devmem == DevmemMode::Require => {
                        tracing::error!(nic = %d.name, "devmem receive unavailable and TCPX_DEVMEM=require: {e}");
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::warn!(nic = %d.name, "devmem receive unavailable ({e}); this NIC uses the host path");
                        None
                    }
                }
            } else {
                None
            };
            let (tx, tx_why) = match cfg.devmem_emulated {
                Some(abi) => (
                    Some(TxDevmem {
                        abi,
                        emulated: true,
                    }),
                    None,
                ),
                None => probe_tx(cfg, &d.name),
            };
            let reported = match (&rx, cfg.devmem_emulated) {
                (_, Some(_)) => DataPath::DevmemEmulated,
                (Some(_), None) => DataPath::Devmem,
                (None, None) => DataPath::Host,
            };
            nics.push(NicPath {
                rx,
                tx,
                tx_why,
                reported,
                name: d.name.clone(),
                pci: nic_pci(&d.name),
                upstream,
            });
        }
        let paths = Paths { nics, gpumemd };
        for (i, d) in devices.iter().enumerate() {
            tracing::info!(
                dev = i,
                nic = %d.name,
                addr = %d.addr,
                speed_mbps = d.speed_mbps,
                path = %paths.nics[i].reported,
                "tcpx device: {}",
                paths.describe(i)
            );
        }
        Ok(paths)
    }

    /// Whether any NIC uses a devmem socket (which runs on the epoll engine).
    pub fn any_devmem(&self) -> bool {
        self.nics.iter().any(|n| n.rx.is_some() || n.tx.is_some())
    }

    /// Whether any NIC receives through a devmem socket.
    pub fn any_devmem_rx(&self) -> bool {
        self.nics.iter().any(|n| n.rx.is_some())
    }

    /// The one line `decide` logs for NIC `i`.
    fn describe(&self, i: usize) -> String {
        let n = &self.nics[i];
        let rx = match (&n.rx, &n.upstream, &self.gpumemd) {
            (None, ..) => "kernel TCP with host memory (no devmem configured or available)".to_string(),
            (Some(DevmemSpec::Emulated { abi, source, .. }), ..) => format!(
                "devmem receive through the emulated NIC ({abi} ABI) into {}",
                match source {
                    PoolSource::Local(b) => format!("a {b}-byte host pool per data socket"),
                    PoolSource::Shared(_) => "parts of gpumemd's pool".to_string(),
                }
            ),
            (Some(DevmemSpec::Kernel { abi, memory, .. }), Some(u), _) => format!(
                "devmem receive ({abi} ABI) into a {}-byte DMA-BUF bound to RX queues {:?} (binding {}); flows steered there by ethtool rules",
                memory.len(),
                u.queues(),
                u.dmabuf_id()
            ),
            (Some(DevmemSpec::Kernel { abi, memory, .. }), None, Some(g)) => format!(
                "devmem receive ({abi} ABI) into gpumemd's {}-byte pool ({}); flows steered by gpumemd to queues {:?}",
                memory.len(),
                if memory.device().is_some() { "GPU memory" } else { "host memory" },
                g.queue_ids()
            ),
            (Some(DevmemSpec::Kernel { abi, .. }), None, None) => format!("devmem receive ({abi} ABI)"),
        };
        let tx = match (n.tx, &n.tx_why) {
            (Some(t), _) if t.emulated => {
                format!("; sends through the emulated devmem NIC ({} ABI)", t.abi)
            }
            (Some(t), _) => format!("; CUDA regions send by devmem TX ({} ABI)", t.abi),
            (None, Some(why)) => {
                format!("; CUDA regions send through bounce staging (no devmem TX: {why})")
            }
            (None, None) => "; CUDA regions send through bounce staging".to_string(),
        };
        rx + &tx
    }

    /// Steers the flows of a receive comm's data sockets (`(nic, socket)`)
    /// to the queues their NIC's pool is bound to. Under `prefer` a rule
    /// that fails leaves its flow unsteered (logged); under `require` the
    /// accept fails.
    pub fn steer(&self, data: &[(usize, TcpStream)]) -> Result<Vec<RuleHandle>> {
        if let Some(g) = &self.gpumemd {
            return g.steer(&data.iter().map(|(_, s)| s).collect::<Vec<_>>());
        }
        let mut rules = Vec::new();
        for (k, (nic, s)) in data.iter().enumerate() {
            let Some(u) = self.nics.get(*nic).and_then(|n| n.upstream.as_ref()) else {
                continue;
            };
            match u.steer(s, k) {
                Ok(r) => rules.push(r),
                Err(e) if u.required() => {
                    crate::gpumemd::withdraw_all(rules);
                    return Err(e);
                }
                Err(e) => tracing::warn!("{e}; this flow stays unsteered"),
            }
        }
        Ok(rules)
    }
}

/// Devmem TX of NIC `ifname`, probed where devmem is configured or CUDA
/// regions can exist: TCPX kernels send from any DMA-BUF (given the NIC's
/// PCI address); upstream kernels where a `bind-tx` probe passes (≥ 6.16,
/// a NIC with netmem TX). `None` with the reason otherwise.
fn probe_tx(cfg: &Config, ifname: &str) -> (Option<TxDevmem>, Option<String>) {
    let configured = cfg.gpumemd_prefix.is_some() || !cfg.devmem_queues.is_empty();
    if cfg.devmem == DevmemMode::Off || !(configured || crate::bounce::cuda_usable()) {
        return (None, None);
    }
    let tx = |abi| TxDevmem {
        abi,
        emulated: false,
    };
    match devmem::sockabi::kernel_abi() {
        Ok(KernelAbi::Tcpx) => match nic_pci(ifname) {
            Some(_) => (Some(tx(KernelAbi::Tcpx)), None),
            None => (None, Some(format!("{ifname} has no PCI address in sysfs"))),
        },
        Ok(KernelAbi::Upstream) => {
            match devmem::netlink::probe_bind(ifname, None, std::time::Duration::from_secs(2)) {
                Ok(()) => (Some(tx(KernelAbi::Upstream)), None),
                Err(e) => (None, Some(e.to_string())),
            }
        }
        Err(e) => (None, Some(e.to_string())),
    }
}

/// The PCI address of a NIC (`/sys/class/net/<if>/device`).
fn nic_pci(ifname: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/net/{ifname}/device")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Where received bytes of a region go.
pub(crate) enum RxRoute {
    /// Host-addressable memory: the region's own, or a CUDA region's staging.
    Host(*mut u8, usize),
    /// Device memory the GPU unpack writes straight into.
    Device(DeviceSpan),
}

/// The process logs bulk copies out of a GPU pool into host memory once.
static GPU_TO_HOST_LOGGED: AtomicBool = AtomicBool::new(false);

/// Where `want` bytes at `at` of `region` go when received from a pool on
/// GPU `pool_gpu` (`None`: a host pool, or no pool at all).
pub(crate) fn rx_route(
    pool_gpu: Option<i32>,
    region: &Region,
    lane: Lane,
    at: u64,
    want: usize,
) -> Result<RxRoute> {
    use crate::memory::RxPath;
    let Some(gpu) = pool_gpu else {
        return region.sink(lane, at, want).map(|p| RxRoute::Host(p, want));
    };
    match region.cuda_ordinal() {
        Some(o) if o == gpu => region.device_span(at, want).map(RxRoute::Device),
        Some(o) => Err(Error::Unsupported(format!(
            "the receive buffer is memory of GPU {o} but the devmem RX pool is on GPU {gpu}; \
             receive into memory of GPU {gpu} (the GPU named by TCPX_GPU_PCI)"
        ))),
        None => {
            if !GPU_TO_HOST_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::warn!("host memory receives from a GPU devmem pool by one device-to-host copy per fragment (slow); register CUDA memory for devmem receives (logged once)");
            }
            region.sink(lane, at, want).map(|p| RxRoute::Host(p, want))
        }
    }
}
