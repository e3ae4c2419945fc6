//! One `Config`, built from the environment in one place.
//!
//! The TCPX plugin's `NCCL_*` variables are accepted where they mean the same
//! thing; `TCPX_*` variables cover the rest and win when both are set.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

mod env_block;
pub use env_block::{EnvNote, LogFilter};

/// A NIC as the user named it: an interface name (`eth1`) or an address (`127.0.0.2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicSpec {
    Name(String),
    Addr(IpAddr),
}

impl NicSpec {
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Config("empty NIC name".into()));
        }
        Ok(match s.parse::<IpAddr>() {
            Ok(ip) => NicSpec::Addr(ip),
            Err(_) => NicSpec::Name(s.to_string()),
        })
    }

    /// A comma-separated list; NCCL's `=`/`^` prefixes are not supported.
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        if s.starts_with('^') || s.starts_with('=') {
            return Err(Error::Config(format!(
                "{s:?}: prefix matching (^, =) is not supported; list interfaces or addresses exactly"
            )));
        }
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Self::parse)
            .collect()
    }
}

/// Whether payload should use devmem (gpumemd-managed RX queues).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevmemMode {
    /// Never contact gpumemd.
    Off,
    /// Use gpumemd when it answers; otherwise fall back to the host path (one log line).
    Prefer,
    /// Fail init when gpumemd does not answer.
    Require,
}

/// MSG_ZEROCOPY for host-memory sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    Off,
    /// Always (even where the kernel reports it copied: loopback, tests).
    On,
    /// Off to a peer on this host (the kernel always copies there); elsewhere
    /// on, until the kernel reports that it copied anyway, then plain sends
    /// on that socket.
    Auto,
}

/// Which progress engine the NIC workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Non-blocking syscalls on sockets epoll reports ready.
    Epoll,
    /// io_uring submissions (SENDMSG_ZC for zero-copy).
    Uring,
    /// io_uring when the kernel's probe says it works, else epoll.
    Auto,
}

/// How a devmem RX pool is imported (`NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxmemImport {
    /// 1 (the original's default): the pool's fd from gpumemd's `get_gpu_fd_<pci>` socket.
    GpuPciClient,
    /// 0: the legacy CUDA IPC handle in `/tmp/nvdma-<pci>`.
    LegacyFile,
}

/// Transport configuration. `Config::from_env()` reads the table in README.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Data NICs; a comm stripes over all of them. Empty = every up, non-loopback interface (or `lo`).
    pub data_nics: Vec<NicSpec>,
    /// NIC of the control socket. `None` = the first data NIC.
    pub ctrl_nic: Option<NicSpec>,
    /// Data sockets per NIC per comm.
    pub sockets_per_nic: usize,
    /// Progress threads per NIC, shared by every comm; a NIC's data
    /// sockets are dealt to them in turn (`TCPX_WORKERS_PER_NIC`).
    pub workers_per_nic: usize,
    /// Bytes per chunk on a data socket.
    pub chunk_size: usize,
    /// Largest chunk of a message sent from CUDA memory: each chunk costs
    /// the bounce path a few CUDA calls, so they are larger, down to 128
    /// KiB where the message would otherwise leave data sockets idle
    /// (`TCPX_CUDA_CHUNK_SIZE`; set it alike on both ends).
    pub cuda_chunk_size: usize,
    /// Messages up to this size travel inline on the control socket (lowest latency).
    pub inline_threshold: usize,
    /// A message up to this size (host memory, or CUDA memory no NIC sends
    /// by devmem TX) also travels inline when
    /// it is lone: no other message of its comm above `inline_threshold` is
    /// in flight, nor was when the previous one was posted (docs/PROTOCOL.md,
    /// **Msg**). It then costs one write, not a receive's round trip before
    /// its chunks may leave. As
    /// the receiving end, the largest inline message a comm accepts
    /// (announced in Welcome); a comm uses the smaller of both ends'
    /// (`TCPX_INLINE_IDLE_MAX`; at or below `inline_threshold`: off).
    pub inline_idle_max: usize,
    /// Requests in flight per comm.
    pub max_requests: usize,
    /// Deadline for connect/accept handshakes to finish once started.
    pub handshake_timeout: Duration,
    /// Half-open connections a listener holds (accepted sockets that have
    /// not presented a Hello, comms still waiting for data sockets); at the
    /// cap the oldest is dropped (`TCPX_MAX_HALF_OPEN`).
    pub max_half_open: usize,
    /// SO_SNDBUF/SO_RCVBUF for data sockets; `None` keeps kernel autotuning.
    pub socket_buffer: Option<usize>,
    /// A peer heard from for this long (no heartbeat, no byte) fails its
    /// comms with `PeerUnresponsive`; `None` never gives up. See
    /// `DEFAULT_PEER_TIMEOUT` for the default's reasons.
    pub peer_timeout: Option<Duration>,
    /// A data socket with bytes outstanding that the peer's TCP has not
    /// acknowledged for this long, while another socket of the comm
    /// advanced, is taken out and its chunks re-sent on the others
    /// (`TCPX_STALL_TIMEOUT_MS`; `None`: only errors take a socket out).
    pub stall_timeout: Option<Duration>,
    /// First wait before a taken-out data socket is connected again,
    /// doubling per failed attempt up to 30 s (`TCPX_RECONNECT_MS`;
    /// `None`: never).
    pub reconnect: Option<Duration>,
    /// TCP_NOTSENT_LOWAT of sending data sockets: the most unsent bytes the
    /// kernel holds per socket before it asks for the next chunk, so a slow
    /// path hoards little (`TCPX_NOTSENT_LOWAT`; 0: the kernel's default).
    pub notsent_lowat: usize,
    /// Folder of gpumemd's UNIX sockets; `None` = no daemon is consulted.
    pub gpumemd_prefix: Option<PathBuf>,
    /// PCI address of the GPU whose RX queues gpumemd manages for us.
    pub gpu_pci: Option<String>,
    pub devmem: DevmemMode,
    /// Register with gpumemd's application registry (the daemon may exit when
    /// its last registered client leaves, so this is opt-in, as in the original).
    pub gpumemd_register: bool,
    /// Pause between installing flow-steering rules and using the comm.
    pub flow_steering_wait: Duration,
    pub engine: EngineKind,
    /// Receive through an emulated devmem NIC of this kernel ABI (tests,
    /// benches): payload lands in an RX pool, fragments are unpacked and
    /// tokens returned exactly as on a devmem NIC.
    pub devmem_emulated: Option<devmem::sockabi::KernelAbi>,
    /// RX pool bytes per data socket of the emulated devmem NIC.
    pub emu_pool_bytes: usize,
    /// The emulated devmem NIC fills pages as their tokens come back, so a
    /// fragment read after its token went back shows as wrong bytes
    /// (`TCPX_EMU_POISON`; tests).
    pub emu_poison: bool,
    /// The emulated devmem NIC also sends host regions, as if they were
    /// DMA-BUFs, so the devmem TX path runs where there is no CUDA
    /// (`TCPX_EMU_TX_HOST`; tests).
    pub emu_tx_host: bool,
    /// Upstream devmem RX without gpumemd: the RX queues of each data NIC
    /// that a DMA-BUF is bound to (`bind-rx`) and its flows steered to
    /// (`TCPX_DEVMEM_QUEUES`, e.g. `8-15`); empty = no upstream binding.
    pub devmem_queues: Vec<u32>,
    /// Bytes of the DMA-BUF bound per NIC for upstream devmem RX
    /// (`TCPX_DEVMEM_POOL_BYTES`).
    pub devmem_pool_bytes: usize,
    /// Folder of the legacy pool handle file `nvdma-<pci>`
    /// (`TCPX_RXMEM_LEGACY_DIR`; the original's fixed `/tmp`).
    pub rxmem_legacy_dir: PathBuf,
    pub zerocopy: ZeroCopy,
    /// Smallest chunk payload sent with MSG_ZEROCOPY.
    pub min_zcopy_size: usize,
    /// Pinned host staging for CUDA memory without devmem (the bounce
    /// path), shared by the process's CUDA regions and allocated at the
    /// first CUDA registration; about four chunks per data socket keeps
    /// every socket busy (`TCPX_STAGING_BYTES`).
    pub staging_bytes: usize,
    /// `NCCL_GPUDIRECTTCPX_FORCE_ACK`: as the original, set TCP_QUICKACK on
    /// a data socket each time a received chunk completes there.
    pub force_ack: bool,
    /// How the devmem receive path imports gpumemd's RX pool
    /// (`NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT`).
    pub rxmem_import: RxmemImport,
    /// What each variable of the TCPX deployment's environment block that
    /// was set does here; `Net::init` logs it once (`log_env`).
    pub env_report: Vec<EnvNote>,
}

/// 10 s. Heartbeats come from our own progress threads, not the
/// application's: a Python GC pause or a busy caller does not delay them,
/// only the whole process stopping does. What stops a healthy process for
/// seconds: CPU quota throttling (100 ms periods), memory reclaim or swap
/// storms, a live-migration blackout (typically under a second), a
/// checkpoint's page faults. 10 s rides out all of these several times
/// over, while a frozen or vanished peer is still reported within seconds.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// 2 s. A healthy path that lost packets recovers within a few
/// retransmission timeouts (200 ms, doubling): 200 + 400 + 800 ms. A path
/// silent for longer while another socket of the same comm moves is
/// broken (a link down, a dead route), and its chunks are better sent on
/// the others now than after TCP's own timeout (the peer timeout).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(2);

pub const MAX_SOCKETS_PER_NIC: usize = 16;
pub const MAX_NICS: usize = 16;
pub const MAX_RECVS: usize = 8;
/// Upper bound of `Config::max_half_open`.
pub const MAX_HALF_OPEN: usize = 65536;
/// Upper bound of `Config::inline_threshold`: messages this small may come
/// inline at any time, up to the eager window (1 MiB) of them.
pub const MAX_INLINE: usize = 64 * 1024;
/// Upper bound of `Config::inline_idle_max`: inline payloads are staged
/// whole in the control buffers (a receiving comm holds two of them).
pub const MAX_INLINE_IDLE: usize = 256 * 1024;

/// Two progress threads per NIC where the CPUs allow it: on the 32-core GPU
/// machine they lifted NCCL's busbw through the plugin 1.7x over one; on a
/// 2-core machine the extra thread only contends (within noise, slightly
/// slower), so one there. See docs/PERFORMANCE.md.
fn default_workers_per_nic() -> usize {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() >= 4 => 2,
        _ => 1,
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_nics: Vec::new(),
            ctrl_nic: None,
            sockets_per_nic: 2,
            workers_per_nic: default_workers_per_nic(),
            chunk_size: 512 * 1024,
            cuda_chunk_size: 2 << 20,
            inline_threshold: 64 * 1024,
            inline_idle_max: MAX_INLINE_IDLE,
            max_requests: 32,
            handshake_timeout: Duration::from_secs(30),
            max_half_open: 256,
            socket_buffer: None,
            peer_timeout: Some(DEFAULT_PEER_TIMEOUT),
            stall_timeout: Some(DEFAULT_STALL_TIMEOUT),
            reconnect: Some(Duration::from_secs(1)),
            notsent_lowat: 1 << 20,
            gpumemd_prefix: None,
            gpu_pci: None,
            devmem: DevmemMode::Prefer,
            gpumemd_register: false,
            flow_steering_wait: Duration::ZERO,
            engine: EngineKind::Epoll,
            devmem_emulated: None,
            emu_pool_bytes: 2 << 20,
            emu_poison: false,
            emu_tx_host: false,
            devmem_queues: Vec::new(),
            devmem_pool_bytes: 256 << 20,
            rxmem_legacy_dir: PathBuf::from(devmem::gpumemd::legacy::LEGACY_DIR),
            zerocopy: ZeroCopy::Auto,
            min_zcopy_size: 32 * 1024,
            staging_bytes: 64 << 20,
            force_ack: false,
            rxmem_import: RxmemImport::GpuPciClient,
            env_report: Vec::new(),
        }
    }
}

impl Config {
    /// How often workers tick their comms (heartbeats, timeouts): often
    /// enough that a silent peer is caught well within a second of its
    /// timeout, rarely enough that idle comms cost nothing.
    /// A stalled data socket is caught within a quarter of the stall timeout.
    pub(crate) fn tick(&self) -> std::time::Duration {
        let ms = self
            .peer_timeout
            .map_or(500, |t| (t.as_millis() / 10) as u64);
        let stall = self
            .stall_timeout
            .map_or(u64::MAX, |t| (t.as_millis() / 4) as u64);
        std::time::Duration::from_millis(ms.min(stall).clamp(10, 500))
    }

    /// Loopback config used by tests and the bench: each address is one "NIC".
    pub fn loopback(addrs: &[&str]) -> Result<Self> {
        let data_nics = addrs
            .iter()
            .map(|a| NicSpec::parse(a))
            .collect::<Result<_>>()?;
        Ok(Config {
            data_nics,
            ..Config::default()
        })
    }

    /// Defaults overridden by environment variables.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// `from_env` over any key lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let first = |keys: &[&'static str]| keys.iter().find_map(|k| get(k).map(|v| (*k, v)));
        let mut c = Config::default();
        if let Some((_, v)) = first(&["TCPX_NICS", "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME"]) {
            c.data_nics = NicSpec::parse_list(&v)?;
        }
        if let Some((_, v)) = first(&[
            "TCPX_CTRL_NIC",
            "NCCL_GPUDIRECTTCPX_CTRL_DEV",
            "NCCL_SOCKET_IFNAME",
        ]) {
            let mut l = NicSpec::parse_list(&v)?;
            c.ctrl_nic = if l.is_empty() {
                None
            } else {
                Some(l.remove(0))
            };
        }
        if let Some((k, v)) = first(&["TCPX_SOCKETS_PER_NIC"]) {
            c.sockets_per_nic = parse_num(k, &v)?;
        } else {
            // The TCPX plugin opens NSOCKS_PERTHREAD x SOCKET_NTHREADS sockets per comm and NIC.
            let per = first(&[
                "NCCL_GPUDIRECTTCPX_NSOCKS_PERTHREAD",
                "NCCL_NSOCKS_PERTHREAD",
            ]);
            let thr = first(&["NCCL_GPUDIRECTTCPX_SOCKET_NTHREADS", "NCCL_SOCKET_NTHREADS"]);
            if per.is_some() || thr.is_some() {
                let p = per.map(|(k, v)| parse_num(k, &v)).transpose()?.unwrap_or(1);
                let t = thr.map(|(k, v)| parse_num(k, &v)).transpose()?.unwrap_or(1);
                c.sockets_per_nic = p * t;
            }
        }
        if let Some((k, v)) = first(&["TCPX_WORKERS_PER_NIC"]) {
            c.workers_per_nic = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_CHUNK_SIZE"]) {
            c.chunk_size = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_CUDA_CHUNK_SIZE"]) {
            c.cuda_chunk_size = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_STAGING_BYTES"]) {
            c.staging_bytes = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_INLINE_THRESHOLD"]) {
            c.inline_threshold = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_INLINE_IDLE_MAX"]) {
            c.inline_idle_max = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_MAX_REQUESTS"]) {
            c.max_requests = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_HANDSHAKE_TIMEOUT_MS"]) {
            c.handshake_timeout = Duration::from_millis(parse_num(k, &v)? as u64);
        }
        if let Some((k, v)) = first(&["TCPX_MAX_HALF_OPEN"]) {
            c.max_half_open = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_SOCKET_BUFFER"]) {
            c.socket_buffer = Some(parse_num(k, &v)?);
        }
        if let Some((k, v)) = first(&["TCPX_PEER_TIMEOUT_MS"]) {
            let ms = parse_num(k, &v)? as u64;
            c.peer_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some((k, v)) = first(&["TCPX_STALL_TIMEOUT_MS"]) {
            let ms = parse_num(k, &v)? as u64;
            c.stall_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some((k, v)) = first(&["TCPX_RECONNECT_MS"]) {
            let ms = parse_num(k, &v)? as u64;
            c.reconnect = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some((k, v)) = first(&["TCPX_NOTSENT_LOWAT"]) {
            c.notsent_lowat = parse_num(k, &v)?;
        }
        if let Some((_, v)) = first(&[
            "TCPX_GPUMEMD_PREFIX",
            "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX",
        ]) {
            c.gpumemd_prefix = Some(PathBuf::from(v));
        }
        if let Some((_, v)) = first(&["TCPX_GPU_PCI"]) {
            c.gpu_pci = Some(v.trim().to_string());
        }
        if let Some((k, v)) = first(&["TCPX_DEVMEM"]) {
            c.devmem = match v.trim() {
                "off" => DevmemMode::Off,
                "prefer" => DevmemMode::Prefer,
                "require" => DevmemMode::Require,
                _ => {
                    return Err(Error::Config(format!(
                        "{k}={v:?}: use off, prefer or require"
                    )))
                }
            };
        }
        if let Some((k, v)) = first(&["TCPX_ENGINE"]) {
            c.engine = match v.trim() {
                "epoll" => EngineKind::Epoll,
                "uring" | "io_uring" => EngineKind::Uring,
                "auto" => EngineKind::Auto,
                _ => {
                    return Err(Error::Config(format!(
                        "{k}={v:?}: use epoll, uring or auto"
                    )))
                }
            };
        }
        if let Some((k, v)) = first(&["TCPX_DEVMEM_EMULATED"]) {
            use devmem::sockabi::KernelAbi;
            c.devmem_emulated = match v.trim() {
                "" | "0" | "off" => None,
                "tcpx" => Some(KernelAbi::Tcpx),
                "upstream" => Some(KernelAbi::Upstream),
                _ => {
                    return Err(Error::Config(format!(
                        "{k}={v:?}: use off, tcpx or upstream"
                    )))
                }
            };
        }
        if let Some((k, v)) = first(&["TCPX_EMU_POOL_BYTES"]) {
            c.emu_pool_bytes = parse_num(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_EMU_POISON"]) {
            c.emu_poison = parse_flag(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_EMU_TX_HOST"]) {
            c.emu_tx_host = parse_flag(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_DEVMEM_QUEUES"]) {
            c.devmem_queues = parse_queues(k, &v)?;
        }
        if let Some((k, v)) = first(&["TCPX_DEVMEM_POOL_BYTES"]) {
            c.devmem_pool_bytes = parse_num(k, &v)?;
        }
        if let Some((_, v)) = first(&["TCPX_RXMEM_LEGACY_DIR"]) {
            c.rxmem_legacy_dir = PathBuf::from(v);
        }
        if let Some((k, v)) = first(&["TCPX_ZEROCOPY"]) {
            c.zerocopy = match v.trim() {
                "off" | "0" => ZeroCopy::Off,
                "on" | "1" => ZeroCopy::On,
                "auto" => ZeroCopy::Auto,
                _ => return Err(Error::Config(format!("{k}={v:?}: use off, on or auto"))),
            };
        }
        if let Some((k, v)) = first(&[
            "TCPX_MIN_ZCOPY_SIZE",
            "NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE",
            // The name the original actually reads (TCPX_PARAM adds NCCL_).
            "NCCL_MIN_ZCOPY_SIZE",
        ]) {
            c.min_zcopy_size = parse_num(k, &v)?;
            // In the original 0 means no MSG_ZEROCOPY at all.
            if c.min_zcopy_size == 0 && k.starts_with("NCCL_") && get("TCPX_ZEROCOPY").is_none() {
                c.zerocopy = ZeroCopy::Off;
            }
        }
        if let Some((k, v)) = first(&[
            "TCPX_GPUMEMD_REGISTER",
            "NCCL_GPUDIRECTTCPX_REPORT_LIFECYCLE",
        ]) {
            c.gpumemd_register = parse_num(k, &v)? != 0;
        }
        if let Some((k, v)) = first(&[
            "TCPX_FLOW_STEERING_WAIT_US",
            "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS",
        ]) {
            c.flow_steering_wait = Duration::from_micros(parse_num(k, &v)? as u64);
        }
        if let Some((k, v)) = first(&["NCCL_GPUDIRECTTCPX_FORCE_ACK"]) {
            c.force_ack = parse_flag(k, &v)?;
        }
        if let Some((k, v)) = first(&["NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT"]) {
            c.rxmem_import = if parse_flag(k, &v)? {
                RxmemImport::GpuPciClient
            } else {
                RxmemImport::LegacyFile
            };
        }
        c.validate()?;
        c.env_report = env_block::notes(&get, &c);
        Ok(c)
    }

    /// Marks the report lines of `vars` as overridden by `by`, for a front
    /// end that sets a field after `from_env` (a NIXL backend option).
    pub fn note_override(&mut self, vars: &[&str], by: &str) {
        for n in self.env_report.iter_mut().filter(|n| vars.contains(&n.var)) {
            n.effect = format!("overridden by {by}");
            n.unhonoured = false;
        }
    }

    /// Logs what the TCPX environment block does here, one line per variable
    /// set (a warning where a value asks for what this build lacks), and the
    /// whole config at debug level. `Net::init` calls it once.
    pub fn log_env(&self) {
        for n in &self.env_report {
            if n.unhonoured {
                tracing::warn!("{}={:?}: {}", n.var, n.value, n.effect);
            } else {
                tracing::info!("{}={:?}: {}", n.var, n.value, n.effect);
            }
        }
        tracing::debug!(config = ?self, "tcpx config");
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.sockets_per_nic == 0 || self.sockets_per_nic > MAX_SOCKETS_PER_NIC {
            return bad(format!(
                "sockets per NIC must be 1..={MAX_SOCKETS_PER_NIC}, got {}",
                self.sockets_per_nic
            ));
        }
        if self.workers_per_nic == 0 || self.workers_per_nic > MAX_SOCKETS_PER_NIC {
            return bad(format!(
                "workers per NIC must be 1..={MAX_SOCKETS_PER_NIC}, got {}",
                self.workers_per_nic
            ));
        }
        if self.data_nics.len() > MAX_NICS {
            return bad(format!(
                "at most {MAX_NICS} data NICs, got {}",
                self.data_nics.len()
            ));
        }
        for (what, v) in [
            ("chunk size", self.chunk_size),
            ("CUDA chunk size", self.cuda_chunk_size),
        ] {
            if !(4096..=(1 << 30)).contains(&v) {
                return bad(format!("{what} must be 4 KiB..=1 GiB, got {v}"));
            }
        }
        if self.inline_threshold > MAX_INLINE {
            return bad(format!(
                "inline threshold must be <= {MAX_INLINE}, got {}",
                self.inline_threshold
            ));
        }
        if self.inline_idle_max > MAX_INLINE_IDLE {
            return bad(format!(
                "inline idle max must be <= {MAX_INLINE_IDLE}, got {}",
                self.inline_idle_max
            ));
        }
        if self.gpumemd_prefix.is_some() && self.devmem != DevmemMode::Off && self.gpu_pci.is_none()
        {
            return bad(
                "a gpumemd prefix is set but TCPX_GPU_PCI (the GPU's PCI address) is not".into(),
            );
        }
        if self.devmem == DevmemMode::Require
            && self.gpumemd_prefix.is_none()
            && self.devmem_queues.is_empty()
        {
            return bad("TCPX_DEVMEM=require needs NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX (gpumemd's socket folder, TCPX kernels) or TCPX_DEVMEM_QUEUES (the RX queues to bind, upstream kernels)".into());
        }
        if self.devmem_pool_bytes == 0 || self.devmem_pool_bytes % 4096 != 0 {
            return bad(format!(
                "TCPX_DEVMEM_POOL_BYTES must be a non-zero multiple of 4096, got {}",
                self.devmem_pool_bytes
            ));
        }
        if self.notsent_lowat > i32::MAX as usize {
            return bad(format!(
                "TCP_NOTSENT_LOWAT must fit a C int, got {}",
                self.notsent_lowat
            ));
        }
        if !(1..=MAX_HALF_OPEN).contains(&self.max_half_open) {
            return bad(format!(
                "max half-open connections must be 1..={MAX_HALF_OPEN}, got {}",
                self.max_half_open
            ));
        }
        if !(8..=1024).contains(&self.max_requests) {
            return bad(format!(
                "max requests must be 8..=1024, got {}",
                self.max_requests
            ));
        }
        Ok(())
    }
}

/// RX queue ids: a comma list of ids and `lo-hi` ranges (`8-15,20`).
fn parse_queues(key: &str, v: &str) -> Result<Vec<u32>> {
    let bad = || Error::Config(format!("{key}={v:?}: list queue ids or ranges, as 8-15,20"));
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let (lo, hi) = (
            lo.parse::<u32>().map_err(|_| bad())?,
            hi.parse::<u32>().map_err(|_| bad())?,
        );
        if lo > hi || hi - lo >= 1024 {
            return Err(bad());
        }
        out.extend(lo..=hi);
    }
    Ok(out)
}

/// 0 or 1, as the original accepts for its switches.
fn parse_flag(key: &str, v: &str) -> Result<bool> {
    match v.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(Error::Config(format!("{key}={v:?}: use 0 or 1"))),
    }
}

fn parse_num(key: &str, v: &str) -> Result<usize> {
    parse_size(v).map_err(|_| Error::Config(format!("{key}={v:?} is not a number")))
}

/// Accepts plain integers and K/M/G suffixes (powers of two), as NCCL users write sizes.
pub fn parse_size(v: &str) -> Result<usize> {
    let t = v.trim();
    let (digits, mult) = match t.as_bytes().last() {
        Some(b'k' | b'K') => (&t[..t.len() - 1], 1usize << 10),
        Some(b'm' | b'M') => (&t[..t.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| Error::Config(format!("{v:?} is not a size")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn tcpx_variables_are_honoured() {
        let c = cfg(&[
            ("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "eth1,eth2,127.0.0.3"),
            ("NCCL_SOCKET_IFNAME", "eth0"),
            ("NCCL_NSOCKS_PERTHREAD", "2"),
            ("NCCL_SOCKET_NTHREADS", "3"),
        ])
        .unwrap();
        assert_eq!(c.data_nics.len(), 3);
        assert_eq!(c.data_nics[2], NicSpec::Addr("127.0.0.3".parse().unwrap()));
        assert_eq!(c.ctrl_nic, Some(NicSpec::Name("eth0".into())));
        assert_eq!(c.sockets_per_nic, 6);
    }

    #[test]
    fn own_names_win_and_sizes_take_suffixes() {
        let c = cfg(&[
            ("TCPX_NICS", "127.0.0.2"),
            ("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "eth1"),
            ("TCPX_CHUNK_SIZE", "1M"),
            ("TCPX_SOCKETS_PER_NIC", "4"),
            ("NCCL_NSOCKS_PERTHREAD", "8"),
        ])
        .unwrap();
        assert_eq!(
            c.data_nics,
            vec![NicSpec::Addr("127.0.0.2".parse().unwrap())]
        );
        assert_eq!(c.chunk_size, 1 << 20);
        assert_eq!(c.sockets_per_nic, 4);
    }

    #[test]
    fn gpumemd_variables_are_honoured() {
        let c = cfg(&[
            ("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX", "/run/tcpx"),
            ("TCPX_GPU_PCI", "0000:04:00.0"),
            ("NCCL_GPUDIRECTTCPX_REPORT_LIFECYCLE", "1"),
            (
                "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS",
                "50000",
            ),
            ("TCPX_DEVMEM", "require"),
        ])
        .unwrap();
        assert_eq!(
            c.gpumemd_prefix.as_deref(),
            Some(std::path::Path::new("/run/tcpx"))
        );
        assert_eq!(c.gpu_pci.as_deref(), Some("0000:04:00.0"));
        assert!(c.gpumemd_register);
        assert_eq!(c.flow_steering_wait, Duration::from_millis(50));
        assert_eq!(c.devmem, DevmemMode::Require);
        // A prefix without a GPU, or require without a prefix, cannot work.
        assert!(cfg(&[("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX", "/run/tcpx")]).is_err());
        assert!(cfg(&[("TCPX_DEVMEM", "require")]).is_err());
        assert!(cfg(&[("TCPX_DEVMEM", "maybe")]).is_err());
    }

    #[test]
    fn failover_settings_are_read_and_zero_turns_them_off() {
        let c = cfg(&[
            ("TCPX_STALL_TIMEOUT_MS", "750"),
            ("TCPX_RECONNECT_MS", "0"),
            ("TCPX_NOTSENT_LOWAT", "256K"),
        ])
        .unwrap();
        assert_eq!(c.stall_timeout, Some(Duration::from_millis(750)));
        assert_eq!(c.reconnect, None);
        assert_eq!(c.notsent_lowat, 256 << 10);
        assert_eq!(
            c.tick(),
            Duration::from_millis(187),
            "a stall is seen within a quarter"
        );
        let d = cfg(&[("TCPX_STALL_TIMEOUT_MS", "0")]).unwrap();
        assert_eq!(d.stall_timeout, None);
        assert_eq!(d.reconnect, Some(Duration::from_secs(1)));
        assert_eq!(d.tick(), Duration::from_millis(500));
        assert!(matches!(
            cfg(&[("TCPX_NOTSENT_LOWAT", "4G")]),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn devmem_queue_lists_and_ranges_parse() {
        let c = cfg(&[
            ("TCPX_DEVMEM_QUEUES", "8-11, 20"),
            ("TCPX_DEVMEM", "require"),
        ])
        .unwrap();
        assert_eq!(c.devmem_queues, vec![8, 9, 10, 11, 20]);
        assert_eq!(c.devmem, DevmemMode::Require);
        for bad in ["x", "5-3", "1-", "0-5000"] {
            assert!(cfg(&[("TCPX_DEVMEM_QUEUES", bad)]).is_err(), "{bad}");
        }
        assert!(cfg(&[("TCPX_DEVMEM_POOL_BYTES", "1000")]).is_err());
    }

    #[test]
    fn bad_values_are_config_errors() {
        assert!(matches!(
            cfg(&[("TCPX_CHUNK_SIZE", "lots")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            cfg(&[("TCPX_INLINE_IDLE_MAX", "257K")]),
            Err(Error::Config(_))
        ));
        assert_eq!(
            cfg(&[("TCPX_INLINE_IDLE_MAX", "128K")])
                .unwrap()
                .inline_idle_max,
            128 << 10
        );
        assert!(matches!(
            cfg(&[("TCPX_SOCKETS_PER_NIC", "0")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            cfg(&[("TCPX_CUDA_CHUNK_SIZE", "1K")]),
            Err(Error::Config(_))
        ));
        assert_eq!(
            cfg(&[("TCPX_CUDA_CHUNK_SIZE", "4M")])
                .unwrap()
                .cuda_chunk_size,
            4 << 20
        );
        assert!(matches!(
            cfg(&[("TCPX_WORKERS_PER_NIC", "0")]),
            Err(Error::Config(_))
        ));
        assert_eq!(
            cfg(&[("TCPX_WORKERS_PER_NIC", "3")])
                .unwrap()
                .workers_per_nic,
            3
        );
        assert!(matches!(
            cfg(&[("TCPX_MAX_REQUESTS", "4")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            cfg(&[("TCPX_MAX_HALF_OPEN", "0")]),
            Err(Error::Config(_))
        ));
        assert_eq!(
            cfg(&[("TCPX_MAX_HALF_OPEN", "1K")]).unwrap().max_half_open,
            1024
        );
        assert!(matches!(
            cfg(&[("NCCL_SOCKET_IFNAME", "^docker")]),
            Err(Error::Config(_))
        ));
    }
}
