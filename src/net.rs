//! `Net`: devices, registration, and what connection setup shares.
//!
//! Setup follows NCCL's v5+ non-blocking contract: `connect` (`connect.rs`)
//! and `accept` (`accept.rs`) return `Ok(None)` until the comm is ready and
//! are called again; nothing waits on the peer.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;

use crate::comm::{Agreed, DataSock};
use crate::config::{Config, EngineKind};
use crate::device::{self, Device};
use crate::engine::{Cmd, CommLink, SockId, TxMode, Watch, Worker};
use crate::error::{Error, Result};
use crate::memory::{HostMemory, MemoryRegion, PtrKind};
use crate::path::Paths;
use crate::stats::{Counters, NicStats, SockCounters, Stats, Tally};

pub(crate) use crate::connect::Connecting;

pub(crate) struct NetInner {
    /// Tells this Net's entries apart in the process-wide connect table.
    pub(crate) id: u64,
    pub cfg: Config,
    /// The engine the workers run (`cfg.engine` resolved by the probe).
    engine: EngineKind,
    /// Every NIC's data path, and what keeps devmem working (gpumemd, bindings).
    pub(crate) paths: Paths,
    pub devices: Vec<Device>,
    pub ctrl_ip: Option<IpAddr>,
    /// `cfg.workers_per_nic` progress workers per device: device `d`'s are
    /// `d * workers_per_nic ..`.
    pub workers: Vec<Worker>,
    counters: Arc<Counters>,
    /// Per device: what its data sockets did.
    nic_tallies: Vec<Arc<Tally>>,
    next_sock_id: AtomicU64,
    /// Per NIC: data sockets dealt to its workers so far.
    dealt: Vec<AtomicU64>,
}

impl NetInner {
    /// Counters for a data socket on `nic` (its NIC's too).
    pub(crate) fn sock_counters(&self, nic: usize) -> Arc<SockCounters> {
        let tally = self.nic_tallies.get(nic).cloned().unwrap_or_default();
        Arc::new(SockCounters::new(tally))
    }

    /// Hands data socket `sock` of a comm to a worker of its NIC
    /// (`receives`: it carries chunks in, else out).
    pub(crate) fn add_data_socket(
        &self,
        nic: usize,
        stream: TcpStream,
        comm: Arc<dyn CommLink>,
        receives: bool,
        sock: SockId,
        counters: Arc<SockCounters>,
    ) -> DataSock {
        let id = self.next_sock_id.fetch_add(1, Ordering::Relaxed);
        let tx = TxMode {
            zerocopy: self.cfg.zerocopy,
            min_zcopy: self.cfg.min_zcopy_size,
            devmem: self.paths.nics.get(nic).and_then(|n| n.rx.clone()),
            devmem_tx: self
                .paths
                .nics
                .get(nic)
                .and_then(|n| n.tx)
                .map(|t| (nic, t)),
            peer_timeout_ms: self.cfg.peer_timeout.map_or(0, |t| t.as_millis() as u64),
            notsent_lowat: self.cfg.notsent_lowat as u32,
            quickack: self.cfg.force_ack,
        };
        let worker = self.deal(nic);
        self.workers[worker].submit(Cmd::Add {
            id,
            stream,
            tx,
            comm,
            receives,
            sock,
            counters,
        });
        DataSock { worker, id }
    }

    /// The worker of `nic` that takes its next data socket: a NIC's sockets
    /// go to its workers in turn, so a comm with as many sockets per NIC
    /// as workers gives each socket a thread of its own.
    fn deal(&self, nic: usize) -> usize {
        let per = self.cfg.workers_per_nic.max(1);
        let turn = self
            .dealt
            .get(nic)
            .map_or(0, |d| d.fetch_add(1, Ordering::Relaxed));
        (nic * per + (turn % per as u64) as usize).min(self.workers.len().saturating_sub(1))
    }

    /// Registers a comm's control socket with the first worker of `nic`.
    pub(crate) fn watch_ctrl(&self, stream: &TcpStream, nic: usize) -> Result<Watch> {
        let w = (nic * self.cfg.workers_per_nic).min(self.workers.len().saturating_sub(1));
        self.workers[w].watches.watch(stream)
    }

    /// The peer's timeout from a handshake field (0 = none).
    pub(crate) fn agreed(
        &self,
        peer_timeout_ms: u32,
        inline_threshold: usize,
        inline_max: usize,
    ) -> Agreed {
        Agreed {
            peer_timeout: (peer_timeout_ms > 0)
                .then(|| Duration::from_millis(peer_timeout_ms as u64)),
            inline_threshold,
            inline_max,
        }
    }

    /// The largest inline message we accept as a receiver, as Welcome
    /// announces it (KiB; never below what any sender may send inline).
    /// Devmem receivers take mid-size payload on their data sockets, into
    /// device memory.
    pub(crate) fn inline_kib(&self) -> u16 {
        if self.paths.any_devmem_rx() {
            return crate::wire::MIN_INLINE_KIB;
        }
        (self.cfg.inline_idle_max / 1024).clamp(
            crate::wire::MIN_INLINE_KIB.into(),
            crate::wire::MAX_INLINE_KIB.into(),
        ) as u16
    }

    /// Our peer timeout as the handshake carries it.
    pub(crate) fn timeout_ms(&self) -> u32 {
        self.cfg
            .peer_timeout
            .map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
    }

    /// Socket options of a comm's sockets. Liveness is the heartbeats'
    /// job on the control socket. A data socket carries chunks only for a
    /// posted receive, which its peer reads at once, so unacknowledged
    /// data there for the peer timeout (TCP_USER_TIMEOUT) means a peer or
    /// path that is gone, never a slow consumer.
    pub(crate) fn tune(&self, s: &TcpStream, data: bool) -> Result<()> {
        s.set_nonblocking(true)
            .map_err(|e| Error::io("set_nonblocking", e))?;
        s.set_nodelay(true)
            .map_err(|e| Error::io("TCP_NODELAY", e))?;
        if let (Some(t), true) = (self.cfg.peer_timeout, data) {
            SockRef::from(s)
                .set_tcp_user_timeout(Some(t))
                .map_err(|e| Error::io("TCP_USER_TIMEOUT", e))?;
        }
        if let Some(b) = self.cfg.socket_buffer {
            let r = SockRef::from(s);
            r.set_send_buffer_size(b)
                .map_err(|e| Error::io("SO_SNDBUF", e))?;
            r.set_recv_buffer_size(b)
                .map_err(|e| Error::io("SO_RCVBUF", e))?;
        }
        Ok(())
    }
}

/// The transport: one per process is typical. Cheap to share behind `&`.
pub struct Net {
    pub(crate) inner: Arc<NetInner>,
}

impl Net {
    /// Resolves the NICs, starts the NIC workers and logs the data path once.
    pub fn init(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        // Once per Net: what the TCPX environment block does here.
        cfg.log_env();
        let mut devices = device::discover(&cfg)?;
        let paths = Paths::decide(&cfg, &devices)?;
        for (d, n) in devices.iter_mut().zip(&paths.nics) {
            d.path = n.reported;
        }
        let ctrl_ip = cfg
            .ctrl_nic
            .as_ref()
            .map(device::resolve)
            .transpose()?
            .map(|(_, ip)| ip);
        let engine = match cfg.engine {
            EngineKind::Epoll => EngineKind::Epoll,
            _ if paths.any_devmem() => {
                tracing::info!("devmem sockets run on the epoll engine");
                EngineKind::Epoll
            }
            wanted => match crate::engine::probe_uring() {
                Ok(()) => EngineKind::Uring,
                Err(why) => {
                    if wanted == EngineKind::Uring {
                        tracing::warn!("io_uring unavailable ({why}); using the epoll engine");
                    } else {
                        tracing::info!("io_uring unavailable ({why}); using the epoll engine");
                    }
                    EngineKind::Epoll
                }
            },
        };
        let counters = Arc::new(Counters::default());
        let n_nics = devices.len();
        let per = cfg.workers_per_nic;
        let workers = devices
            .iter()
            .flat_map(|d| (0..per).map(move |k| (d, k)))
            .map(|(d, k)| {
                let name = if per == 1 {
                    format!("tcpx-{}", d.name)
                } else {
                    format!("tcpx-{}-{k}", d.name)
                };
                Worker::spawn(name, engine, counters.clone(), cfg.tick())
            })
            .collect::<Result<Vec<_>>>()?;
        let nic_tallies = devices.iter().map(|_| Arc::default()).collect();
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Net {
            inner: Arc::new(NetInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                engine,
                cfg,
                paths,
                devices,
                ctrl_ip,
                workers,
                counters,
                nic_tallies,
                next_sock_id: AtomicU64::new(1),
                dealt: (0..n_nics).map(|_| AtomicU64::new(0)).collect(),
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    pub fn devices(&self) -> &[Device] {
        &self.inner.devices
    }

    /// The progress engine in use (`Config::engine` after probing).
    pub fn engine(&self) -> EngineKind {
        self.inner.engine
    }

    /// Data-path counters since init (zero-copy use, fallbacks).
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// Per device: what the data sockets of every comm on it did since
    /// init (bytes, chunks, re-sends, stalls, failures, reconnects).
    pub fn nic_stats(&self) -> Vec<NicStats> {
        self.inner
            .devices
            .iter()
            .zip(&self.inner.nic_tallies)
            .enumerate()
            .map(|(nic, (d, t))| NicStats {
                nic,
                name: d.name.clone(),
                counts: t.snapshot(),
            })
            .collect()
    }

    pub(crate) fn device(&self, dev: usize) -> Result<&Device> {
        self.inner.devices.get(dev).ok_or(Error::NoSuchDevice {
            dev,
            count: self.inner.devices.len(),
        })
    }

    /// Registers memory the transport owns for the region's lifetime.
    pub fn reg_mr(&self, mem: HostMemory) -> MemoryRegion {
        let mut mr = MemoryRegion::owned(mem);
        crate::region_tx::attach(&self.inner.paths, &self.inner.cfg, &mut mr);
        mr
    }

    /// Registers caller-owned memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid, and untouched by the caller while a
    /// request uses it, until `dereg_mr` succeeds and every request using
    /// the region has completed.
    pub unsafe fn reg_mr_raw(
        &self,
        ptr: *mut u8,
        len: usize,
        kind: PtrKind,
    ) -> Result<MemoryRegion> {
        if ptr.is_null() && len > 0 {
            return Err(Error::InvalidArgument("null pointer".into()));
        }
        if kind == PtrKind::Cuda {
            let cfg = &self.inner.cfg;
            let b = crate::bounce::CudaBounce::register(
                ptr,
                len,
                cfg.chunk_size
                    .max(cfg.cuda_chunk_size)
                    .max(cfg.inline_threshold),
                cfg.staging_bytes,
            )?;
            // SAFETY: forwarded to the caller's contract.
            let mut mr = unsafe { MemoryRegion::cuda(ptr, len, b) };
            crate::region_tx::attach(&self.inner.paths, cfg, &mut mr);
            return Ok(mr);
        }
        crate::bounce::refuse_device_as_host(ptr)?;
        // SAFETY: forwarded to the caller's contract.
        let mut mr = unsafe { MemoryRegion::foreign(ptr, len, kind) };
        crate::region_tx::attach(&self.inner.paths, &self.inner.cfg, &mut mr);
        Ok(mr)
    }

    /// Deregisters; returns owned memory. `Error::Busy` while requests use the
    /// region (the memory then lives on until they finish).
    pub fn dereg_mr(&self, mr: MemoryRegion) -> Result<Option<HostMemory>> {
        mr.into_owned()
    }
}

impl Drop for Net {
    /// Abandoned `connect_bytes` progress closes with the Net (`tcpx_finalize`),
    /// even while comms keep the workers alive.
    fn drop(&mut self) {
        crate::connect::forget_net(self.inner.id);
    }
}

/// Writes a whole handshake message to a fresh socket, whose send buffer is empty.
pub(crate) fn write_handshake(mut w: impl Write, bytes: &[u8]) -> Result<()> {
    match w.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(Error::ConnectionLost(
            "handshake write was cut short".into(),
        )),
        Err(e) => Err(Error::io("handshake write", e)),
    }
}

/// Reads what is available into `buf` up to `want` bytes; true once complete.
pub(crate) fn read_some(mut s: &TcpStream, buf: &mut Vec<u8>, want: usize) -> Result<bool> {
    while buf.len() < want {
        let mut tmp = [0u8; 512];
        let room = (want - buf.len()).min(tmp.len());
        match s.read(&mut tmp[..room]) {
            Ok(0) => {
                return Err(Error::ConnectionLost(
                    "peer closed during the handshake".into(),
                ))
            }
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("handshake read", e)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nics_sockets_go_to_its_workers_in_turn() {
        let mut cfg = Config::loopback(&["127.0.0.1", "127.0.0.2"]).unwrap();
        cfg.workers_per_nic = 2;
        let net = Net::init(cfg).unwrap();
        // Data socket i of a comm is on NIC i mod 2, as connect opens them.
        let first: Vec<usize> = (0..4).map(|i| net.inner.deal(i % 2)).collect();
        assert_eq!(
            first,
            [0, 2, 1, 3],
            "each socket of the comm on a thread of its own"
        );
        let second: Vec<usize> = (0..4).map(|i| net.inner.deal(i % 2)).collect();
        assert_eq!(second, [0, 2, 1, 3], "the next comm's too");
        let mut cfg = Config::loopback(&["127.0.0.1"]).unwrap();
        cfg.workers_per_nic = 3;
        let net = Net::init(cfg).unwrap();
        let turns: Vec<usize> = (0..7).map(|_| net.inner.deal(0)).collect();
        assert_eq!(turns, [0, 1, 2, 0, 1, 2, 0]);
    }
}
