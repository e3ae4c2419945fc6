//! `Net`: devices, registration, and connection setup (listen / connect / accept).
//!
//! Setup follows NCCL's v5+ non-blocking contract: `connect` and `accept`
//! return `Ok(None)` until the comm is ready and are called again; nothing
//! here waits on the peer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::comm::{Agreed, DataSock, RecvComm, SendComm};
use crate::config::{Config, EngineKind, MAX_NICS, MAX_SOCKETS_PER_NIC};
use crate::device::{self, DataPath, Device};
use crate::engine::{Cmd, CommLink, TxMode, Watch, Worker};
use crate::error::{Error, Result};
use crate::gpumemd::{Gpumemd, PoolSource};
use crate::handle::{Handle, HANDLE_SIZE, STAGE_OFFSET};
use crate::memory::{HostMemory, MemoryRegion, PtrKind};
use crate::stats::{Counters, Stats};
use crate::wire::{Hello, Reject, Role, Welcome, HELLO_LEN, REJECT_VERSION, WELCOME_LEN};

pub(crate) struct NetInner {
    pub cfg: Config,
    /// The engine the workers run (`cfg.engine` resolved by the probe).
    engine: EngineKind,
    gpumemd: Option<Gpumemd>,
    pub devices: Vec<Device>,
    pub ctrl_ip: Option<IpAddr>,
    /// `cfg.workers_per_nic` progress workers per device: device `d`'s are
    /// `d * workers_per_nic ..`.
    pub workers: Vec<Worker>,
    counters: Arc<Counters>,
    next_sock_id: AtomicU64,
}

impl NetInner {
    /// Hands a data socket of a comm to a worker of its NIC (`receives`:
    /// it carries chunks in, else out).
    pub(crate) fn add_data_socket(
        &self,
        nic: usize,
        stream: TcpStream,
        comm: Arc<dyn CommLink>,
        receives: bool,
    ) -> DataSock {
        let id = self.next_sock_id.fetch_add(1, Ordering::Relaxed);
        let tx = TxMode {
            zerocopy: self.cfg.zerocopy,
            min_zcopy: self.cfg.min_zcopy_size,
            devmem_emulated: self.cfg.devmem_emulated.map(|abi| {
                let shared = self.gpumemd.as_ref().and_then(|g| g.pool.clone());
                let source = shared.map_or(
                    PoolSource::Local(self.cfg.emu_pool_bytes),
                    PoolSource::Shared,
                );
                (abi, source)
            }),
            peer_timeout_ms: self.cfg.peer_timeout.map_or(0, |t| t.as_millis() as u64),
            quickack: self.cfg.force_ack,
        };
        let per = self.cfg.workers_per_nic;
        let worker = nic * per + (id % per as u64) as usize;
        self.workers[worker].submit(Cmd::Add {
            id,
            stream,
            tx,
            comm,
            receives,
        });
        DataSock { worker, id }
    }

    /// Registers a comm's control socket with the first worker of `nic`.
    pub(crate) fn watch_ctrl(&self, stream: &TcpStream, nic: usize) -> Result<Watch> {
        let w = (nic * self.cfg.workers_per_nic).min(self.workers.len().saturating_sub(1));
        self.workers[w].watches.watch(stream)
    }

    /// The peer's timeout from a handshake field (0 = none).
    pub(crate) fn agreed(&self, peer_timeout_ms: u32, inline_threshold: usize) -> Agreed {
        Agreed {
            peer_timeout: (peer_timeout_ms > 0)
                .then(|| Duration::from_millis(peer_timeout_ms as u64)),
            inline_threshold,
        }
    }

    /// Our peer timeout as the handshake carries it.
    fn timeout_ms(&self) -> u32 {
        self.cfg
            .peer_timeout
            .map_or(0, |t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
    }

    /// Socket options of a comm's sockets. Liveness is the heartbeats'
    /// job on the control socket. A data socket carries chunks only for a
    /// posted receive, which its peer reads at once, so unacknowledged
    /// data there for the peer timeout (TCP_USER_TIMEOUT) means a peer or
    /// path that is gone, never a slow consumer.
    fn tune(&self, s: &TcpStream, data: bool) -> Result<()> {
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
    inner: Arc<NetInner>,
}

impl Net {
    /// Resolves the NICs, starts the NIC workers and logs the data path once.
    pub fn init(cfg: Config) -> Result<Self> {
        cfg.validate()?;
        // Once per Net: what the TCPX environment block does here.
        cfg.log_env();
        let gpumemd = Gpumemd::connect(&cfg)?;
        let path = if cfg.devmem_emulated.is_some() {
            DataPath::DevmemEmulated
        } else if gpumemd.is_some() {
            DataPath::Devmem
        } else {
            DataPath::Host
        };
        let devices = device::discover(&cfg, path)?;
        let ctrl_ip = cfg
            .ctrl_nic
            .as_ref()
            .map(device::resolve)
            .transpose()?
            .map(|(_, ip)| ip);
        let engine = match cfg.engine {
            EngineKind::Epoll => EngineKind::Epoll,
            _ if cfg.devmem_emulated.is_some() => {
                tracing::info!("the emulated devmem NIC runs on the epoll engine");
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
        for (i, d) in devices.iter().enumerate() {
            tracing::info!(
                dev = i,
                nic = %d.name,
                addr = %d.addr,
                speed_mbps = d.speed_mbps,
                path = %d.path,
                "{}",
                match d.path {
                    DataPath::Devmem => "tcpx device: flows steered by gpumemd; payload still received by kernel TCP (no devmem RX in this build)",
                    DataPath::Host => "tcpx device: kernel TCP with host memory (no gpumemd configured or answering)",
                    DataPath::DevmemEmulated => "tcpx device: receiving through the emulated devmem NIC (RX pool, fragments, token return)",
                }
            );
        }
        Ok(Net {
            inner: Arc::new(NetInner {
                engine,
                cfg,
                gpumemd,
                devices,
                ctrl_ip,
                workers,
                counters,
                next_sock_id: AtomicU64::new(1),
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

    fn device(&self, dev: usize) -> Result<&Device> {
        self.inner.devices.get(dev).ok_or(Error::NoSuchDevice {
            dev,
            count: self.inner.devices.len(),
        })
    }

    /// Registers memory the transport owns for the region's lifetime.
    pub fn reg_mr(&self, mem: HostMemory) -> MemoryRegion {
        MemoryRegion::owned(mem)
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
            return Ok(unsafe { MemoryRegion::cuda(ptr, len, b) });
        }
        crate::bounce::refuse_device_as_host(ptr)?;
        // SAFETY: forwarded to the caller's contract.
        Ok(unsafe { MemoryRegion::foreign(ptr, len, kind) })
    }

    /// Deregisters; returns owned memory. `Error::Busy` while requests use the
    /// region (the memory then lives on until they finish).
    pub fn dereg_mr(&self, mr: MemoryRegion) -> Result<Option<HostMemory>> {
        mr.into_owned()
    }

    /// Listens on device `dev`; the handle goes to the peer out of band.
    pub fn listen(&self, dev: usize) -> Result<(Handle, ListenComm)> {
        let d = self.device(dev)?;
        let mut listeners = Vec::new();
        for (nic, dv) in self.inner.devices.iter().enumerate() {
            listeners.push((bind_listener(dv.addr)?, Some(nic)));
        }
        let ctrl_ip = self.inner.ctrl_ip.unwrap_or(d.addr);
        let ctrl_at = match self.inner.devices.iter().position(|x| x.addr == ctrl_ip) {
            Some(i) => i,
            None => {
                listeners.push((bind_listener(ctrl_ip)?, None));
                listeners.len() - 1
            }
        };
        let ctrl_addr = listeners[ctrl_at]
            .0
            .local_addr()
            .map_err(|e| Error::io("getsockname", e))?;
        let data_addrs = listeners
            .iter()
            .filter(|(_, nic)| nic.is_some())
            .map(|(l, _)| l.local_addr().map_err(|e| Error::io("getsockname", e)))
            .collect::<Result<Vec<_>>>()?;
        let handle = Handle {
            secret: random_secret(),
            listen_id: rand::random(),
            addr: ctrl_addr,
            stage: None,
        };
        let comm = ListenComm {
            net: self.inner.clone(),
            secret: handle.secret,
            listeners,
            data_addrs,
            fresh: Vec::new(),
            partial: HashMap::new(),
            steering: Vec::new(),
        };
        Ok((handle, comm))
    }

    /// Connects to a listener. `Ok(None)`: not ready yet, call again with the same handle.
    pub fn connect(&self, dev: usize, handle: &mut Handle) -> Result<Option<SendComm>> {
        let d = self.device(dev)?.clone();
        if handle.stage.is_none() {
            let local = self.inner.ctrl_ip.unwrap_or(d.addr);
            let sock = start_connect(local, handle.addr)?;
            handle.stage = Some(Box::new(Connecting {
                deadline: Instant::now() + self.inner.cfg.handshake_timeout,
                stage: Stage::Ctrl { sock },
            }));
        }
        let secret = handle.secret;
        let Some(c) = handle.stage.as_mut() else {
            return Err(Error::InvalidArgument("connect state lost".into()));
        };
        let result = c.advance(&self.inner, secret);
        match result {
            Ok(Some(_)) | Err(_) => handle.stage = None,
            Ok(None) => {}
        }
        result
    }

    /// `connect` on a raw 128-byte handle buffer, for C hosts (our C ABI, the
    /// NCCL plugin): the progress lives in a table keyed by the handle's
    /// caller-private stage word, so calling again with the same buffer resumes.
    pub fn connect_bytes(
        &self,
        dev: usize,
        bytes: &mut [u8; HANDLE_SIZE],
    ) -> Result<Option<SendComm>> {
        static CONNECTING: OnceLock<Mutex<HashMap<u64, Handle>>> = OnceLock::new();
        let table = CONNECTING.get_or_init(|| Mutex::new(HashMap::new()));
        let mut stage = [0u8; 8];
        stage.copy_from_slice(&bytes[STAGE_OFFSET..]);
        let mut map = table.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = match map.remove(&u64::from_le_bytes(stage)) {
            Some(h) => h,
            None => Handle::from_bytes(&bytes[..])?,
        };
        bytes[STAGE_OFFSET..].fill(0);
        let comm = self.connect(dev, &mut h)?;
        if comm.is_none() {
            let id = loop {
                let id: u64 = rand::random();
                if id != 0 && !map.contains_key(&id) {
                    break id;
                }
            };
            map.insert(id, h);
            bytes[STAGE_OFFSET..].copy_from_slice(&id.to_le_bytes());
        }
        Ok(comm)
    }

    /// `connect` until ready or `timeout`; the listener must be accepted elsewhere meanwhile.
    pub fn connect_wait(
        &self,
        dev: usize,
        handle: &mut Handle,
        timeout: Duration,
    ) -> Result<SendComm> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.connect(dev, handle)? {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                handle.stage = None;
                return Err(Error::Timeout {
                    what: format!("connecting to {}", handle.addr),
                    after_ms: timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn random_secret() -> [u8; 16] {
    loop {
        let s: [u8; 16] = rand::random();
        if s != [0; 16] {
            return s;
        }
    }
}

fn bind_listener(ip: IpAddr) -> Result<TcpListener> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| Error::io("bind listener", e))?;
    l.set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    Ok(l)
}

fn start_connect(local: IpAddr, remote: SocketAddr) -> Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(remote),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(|e| Error::io("socket", e))?;
    sock.set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    if local.is_ipv4() == remote.is_ipv4() {
        // Pin the source NIC; the kernel routes by source address on multi-NIC hosts.
        sock.bind(&SocketAddr::new(local, 0).into())
            .map_err(|e| Error::io("bind source address", e))?;
    }
    match sock.connect(&remote.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(Error::io("connect", e)),
    }
    Ok(sock)
}

/// True once a non-blocking connect finished; its error if it failed.
fn connected(sock: &Socket, to: SocketAddr) -> Result<bool> {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n <= 0 {
        return Ok(false);
    }
    match sock.take_error() {
        Ok(None) => Ok(true),
        Ok(Some(e)) | Err(e) => Err(Error::ConnectionLost(format!("connect to {to}: {e}"))),
    }
}

/// A listener's Reject, where a Welcome was expected, as an error.
fn refused(buf: &[u8]) -> Result<()> {
    match crate::wire::decode_prefix(buf) {
        Ok(p) if p.kind == crate::wire::Kind::Reject => Err(Error::Protocol(
            "the listener refused the connection: it speaks another wire version; run the same tcpx-rs release on both sides".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes a whole handshake message to a fresh socket, whose send buffer is empty.
fn write_handshake(mut w: impl Write, bytes: &[u8]) -> Result<()> {
    match w.write(bytes) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(_) => Err(Error::ConnectionLost(
            "handshake write was cut short".into(),
        )),
        Err(e) => Err(Error::io("handshake write", e)),
    }
}

/// Reads what is available into `buf` up to `want` bytes; true once complete.
fn read_some(mut s: &TcpStream, buf: &mut Vec<u8>, want: usize) -> Result<bool> {
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

// ------------------------------------------------------------------ connect

pub(crate) struct Connecting {
    deadline: Instant,
    stage: Stage,
}

struct DataConn {
    sock: Socket,
    nic: usize,
    index: u16,
    remote: SocketAddr,
    hello_sent: bool,
}

enum Stage {
    Ctrl {
        sock: Socket,
    },
    Welcome {
        stream: TcpStream,
        buf: Vec<u8>,
    },
    Data {
        ctrl: TcpStream,
        comm_id: u64,
        peer_timeout_ms: u32,
        conns: Vec<DataConn>,
    },
    Failed,
}

impl Connecting {
    fn advance(&mut self, net: &Arc<NetInner>, secret: [u8; 16]) -> Result<Option<SendComm>> {
        if Instant::now() > self.deadline {
            return Err(Error::Timeout {
                what: "connecting (is the listener's process calling accept()?)".into(),
                after_ms: net.cfg.handshake_timeout.as_millis() as u64,
            });
        }
        let n_local = net.devices.len();
        let n_data = n_local * net.cfg.sockets_per_nic;
        loop {
            match std::mem::replace(&mut self.stage, Stage::Failed) {
                Stage::Ctrl { sock } => {
                    let to = sock
                        .peer_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
                    if !connected(&sock, to)? {
                        self.stage = Stage::Ctrl { sock };
                        return Ok(None);
                    }
                    let stream: TcpStream = sock.into();
                    net.tune(&stream, false)?;
                    let hello = Hello {
                        secret,
                        comm_id: 0,
                        role: Role::Control,
                        n_data: n_data as u16,
                        inline_threshold: net.cfg.inline_threshold as u32,
                        peer_timeout_ms: net.timeout_ms(),
                    };
                    write_handshake(&stream, &hello.encode())?;
                    self.stage = Stage::Welcome {
                        stream,
                        buf: Vec::new(),
                    };
                }
                Stage::Welcome { stream, mut buf } => {
                    if buf.len() >= crate::wire::PREFIX_LEN {
                        refused(&buf)?;
                    }
                    let mut want = WELCOME_LEN;
                    if buf.len() >= WELCOME_LEN {
                        want += Welcome::decode(&buf)?.n_nics as usize * crate::wire::ADDR_LEN;
                    }
                    if !read_some(&stream, &mut buf, want)? {
                        self.stage = Stage::Welcome { stream, buf };
                        return Ok(None);
                    }
                    if buf.len() == WELCOME_LEN {
                        self.stage = Stage::Welcome { stream, buf };
                        continue; // header complete; now the addresses
                    }
                    let w = Welcome::decode(&buf)?;
                    let remotes = Welcome::decode_addrs(&buf[WELCOME_LEN..])?;
                    let mut conns = Vec::with_capacity(n_data);
                    for index in 0..n_data {
                        let nic = index % n_local;
                        let remote = remotes[nic % remotes.len()];
                        conns.push(DataConn {
                            sock: start_connect(net.devices[nic].addr, remote)?,
                            nic,
                            index: index as u16,
                            remote,
                            hello_sent: false,
                        });
                    }
                    self.stage = Stage::Data {
                        ctrl: stream,
                        comm_id: w.comm_id,
                        peer_timeout_ms: w.peer_timeout_ms,
                        conns,
                    };
                }
                Stage::Data {
                    ctrl,
                    comm_id,
                    peer_timeout_ms,
                    mut conns,
                } => {
                    let mut all = true;
                    for c in conns.iter_mut().filter(|c| !c.hello_sent) {
                        if !connected(&c.sock, c.remote)? {
                            all = false;
                            continue;
                        }
                        let hello = Hello {
                            secret,
                            comm_id,
                            role: Role::Data { index: c.index },
                            n_data: n_data as u16,
                            inline_threshold: 0,
                            peer_timeout_ms: 0,
                        };
                        write_handshake(&c.sock, &hello.encode())?;
                        c.hello_sent = true;
                    }
                    if !all {
                        self.stage = Stage::Data {
                            ctrl,
                            comm_id,
                            peer_timeout_ms,
                            conns,
                        };
                        return Ok(None);
                    }
                    let mut data = Vec::with_capacity(conns.len());
                    for c in conns {
                        let stream: TcpStream = c.sock.into();
                        net.tune(&stream, true)?;
                        data.push((c.nic, stream));
                    }
                    let agreed = net.agreed(peer_timeout_ms, net.cfg.inline_threshold);
                    return SendComm::new(net.clone(), ctrl, data, agreed).map(Some);
                }
                Stage::Failed => {
                    return Err(Error::InvalidArgument("connect already failed".into()))
                }
            }
        }
    }
}

// ------------------------------------------------------------------- accept

struct Fresh {
    stream: TcpStream,
    nic: Option<usize>,
    buf: Vec<u8>,
    deadline: Instant,
}

struct Partial {
    ctrl: TcpStream,
    /// The client's control Hello: its inline threshold and peer timeout.
    hello: Hello,
    data: Vec<Option<(usize, TcpStream)>>,
    deadline: Instant,
}

/// How long an accepted socket may take to present its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A listening endpoint (from `Net::listen`).
pub struct ListenComm {
    net: Arc<NetInner>,
    secret: [u8; 16],
    /// Per data NIC (index = NIC), then possibly a control-only listener.
    listeners: Vec<(TcpListener, Option<usize>)>,
    data_addrs: Vec<SocketAddr>,
    fresh: Vec<Fresh>,
    partial: HashMap<u64, Partial>,
    /// Accepted comms waiting out `flow_steering_wait`.
    steering: Vec<(Instant, RecvComm)>,
}

impl ListenComm {
    /// Accepts the next connection. `Ok(None)`: none ready yet, call again.
    /// Sockets that fail the handshake (wrong secret, garbage, silence) are
    /// dropped without disturbing other connections.
    pub fn accept(&mut self) -> Result<Option<RecvComm>> {
        let now = Instant::now();
        if let Some(i) = self.steering.iter().position(|(at, _)| *at <= now) {
            return Ok(Some(self.steering.swap_remove(i).1));
        }
        for (l, nic) in &self.listeners {
            loop {
                match l.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_ok() {
                            self.fresh.push(Fresh {
                                stream,
                                nic: *nic,
                                buf: Vec::with_capacity(HELLO_LEN),
                                deadline: now + HELLO_TIMEOUT,
                            });
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io("accept", e)),
                }
            }
        }
        let mut i = 0;
        while i < self.fresh.len() {
            let f = &mut self.fresh[i];
            let read = read_some(&f.stream, &mut f.buf, HELLO_LEN);
            if let Some(v) = crate::wire::foreign_version(&f.buf) {
                // Told before it waits for a Hello length of our version.
                tracing::warn!("refused a tcpx-rs peer that speaks wire version {v} (we speak {}); run the same release on both sides", crate::wire::VERSION);
                let _ = write_handshake(
                    &f.stream,
                    &Reject {
                        reason: REJECT_VERSION,
                    }
                    .encode(),
                );
                self.fresh.swap_remove(i);
                continue;
            }
            // Garbage is dropped as soon as its first header bytes show it.
            let read = match read {
                Ok(false) if f.buf.len() >= crate::wire::PREFIX_LEN => {
                    crate::wire::decode_prefix(&f.buf).map(|_| false)
                }
                r => r,
            };
            match read {
                Ok(false) if now < f.deadline => {
                    i += 1;
                    continue;
                }
                Ok(false) => {
                    tracing::warn!(
                        "dropping a connection that sent no hello within {HELLO_TIMEOUT:?}"
                    );
                    self.fresh.swap_remove(i);
                }
                Err(e) => {
                    tracing::debug!("dropping a connection during its hello: {e}");
                    self.fresh.swap_remove(i);
                }
                Ok(true) => {
                    let f = self.fresh.swap_remove(i);
                    match self.on_hello(f) {
                        Ok(Some(comm)) => return Ok(Some(comm)),
                        Ok(None) => {}
                        // Our own side failed (gpumemd under `require`): the caller must know.
                        Err(e @ Error::Gpumemd(_)) => return Err(e),
                        Err(e) => tracing::warn!("refused a connection: {e}"),
                    }
                }
            }
        }
        let timeout = self.net.cfg.handshake_timeout;
        self.partial.retain(|id, p| {
            let keep = now < p.deadline;
            if !keep {
                tracing::warn!(
                    comm_id = id,
                    "dropping a connection whose data sockets did not arrive within {timeout:?}"
                );
            }
            keep
        });
        Ok(None)
    }

    /// `accept` until a comm arrives or `timeout` passes.
    pub fn accept_wait(&mut self, timeout: Duration) -> Result<RecvComm> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.accept()? {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: "accepting a connection".into(),
                    after_ms: timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn on_hello(&mut self, f: Fresh) -> Result<Option<RecvComm>> {
        let h = Hello::decode(&f.buf)?;
        if !constant_time_eq(&h.secret, &self.secret) {
            return Err(Error::Protocol("wrong secret in hello".into()));
        }
        let max_data = MAX_NICS * MAX_SOCKETS_PER_NIC;
        match h.role {
            Role::Control => {
                if h.n_data == 0 || h.n_data as usize > max_data {
                    return Err(Error::Protocol(format!(
                        "{} data sockets announced",
                        h.n_data
                    )));
                }
                let comm_id: u64 = rand::random();
                let welcome = Welcome {
                    comm_id,
                    n_nics: self.data_addrs.len() as u16,
                    peer_timeout_ms: self.net.timeout_ms(),
                };
                write_handshake(&f.stream, &welcome.encode(&self.data_addrs))?;
                self.partial.insert(
                    comm_id,
                    Partial {
                        ctrl: f.stream,
                        hello: h,
                        data: (0..h.n_data).map(|_| None).collect(),
                        deadline: Instant::now() + self.net.cfg.handshake_timeout,
                    },
                );
                Ok(None)
            }
            Role::Data { index } => {
                let nic = f.nic.ok_or_else(|| {
                    Error::Protocol("data socket on the control-only listener".into())
                })?;
                let p = self.partial.get_mut(&h.comm_id).ok_or_else(|| {
                    Error::Protocol(format!("data socket for unknown comm {:#x}", h.comm_id))
                })?;
                let slot = p
                    .data
                    .get_mut(index as usize)
                    .filter(|s| s.is_none())
                    .ok_or_else(|| {
                        Error::Protocol(format!("bad or duplicate data socket index {index}"))
                    })?;
                *slot = Some((nic, f.stream));
                if p.data.iter().any(Option::is_none) {
                    return Ok(None);
                }
                let Some(p) = self.partial.remove(&h.comm_id) else {
                    return Ok(None);
                };
                self.net.tune(&p.ctrl, false)?;
                let data: Vec<(usize, TcpStream)> = p.data.into_iter().flatten().collect();
                let flows = match &self.net.gpumemd {
                    Some(g) => g.steer(&data.iter().map(|(_, s)| s).collect::<Vec<_>>())?,
                    None => Vec::new(),
                };
                for (_, stream) in &data {
                    self.net.tune(stream, true)?;
                }
                let agreed = self
                    .net
                    .agreed(p.hello.peer_timeout_ms, p.hello.inline_threshold as usize);
                let comm = RecvComm::new(self.net.clone(), p.ctrl, data, flows, agreed)?;
                let wait = self.net.cfg.flow_steering_wait;
                if wait.is_zero() {
                    return Ok(Some(comm));
                }
                // Hand the comm out once the NIC has had time to apply its rules.
                self.steering.push((Instant::now() + wait, comm));
                Ok(None)
            }
        }
    }

    /// Closes the listener; half-open connections are dropped.
    pub fn close(self) {}
}

fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
