//! A mock gpumemd speaking the real protocol on the real socket names, with
//! memfd-backed pools (or a pool fd the caller hands it, such as an exported
//! GPU pool) and fault switches. Thread-based; every wait is
//! bounded, so dropping it never hangs.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use super::client::{FlowRule, GpumemdClient, OK_REPLY};
use super::conn::{Conn, Received};
use super::frame::PoolMetadata;
use super::proto::{Payload, QueueIdResponse, RpcStatus, UnixSocketProto};
use super::{
    fd_socket_name, metadata_socket_name, APP_REGISTRY_SOCKET, QUEUE_IDS_SOCKET,
    RULE_INSTALL_SOCKET, RULE_UNINSTALL_SOCKET,
};

/// How often blocked mock threads look at the stop flag.
const TICK: Duration = Duration::from_millis(20);
/// A request connection idle this long is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// Budget for reading one request once bytes started arriving.
const REQUEST_BUDGET: Duration = Duration::from_secs(2);

/// One of the daemon's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    GpuFd,
    GpuMetadata,
    RuleInstall,
    RuleUninstall,
    QueueIds,
    Registry,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::GpuFd,
        Endpoint::GpuMetadata,
        Endpoint::RuleInstall,
        Endpoint::RuleUninstall,
        Endpoint::QueueIds,
        Endpoint::Registry,
    ];

    /// Socket file name under the prefix.
    pub fn socket_name(self, gpu_pci: &str) -> String {
        match self {
            Endpoint::GpuFd => fd_socket_name(gpu_pci),
            Endpoint::GpuMetadata => metadata_socket_name(gpu_pci),
            Endpoint::RuleInstall => RULE_INSTALL_SOCKET.into(),
            Endpoint::RuleUninstall => RULE_UNINSTALL_SOCKET.into(),
            Endpoint::QueueIds => QUEUE_IDS_SOCKET.into(),
            Endpoint::Registry => APP_REGISTRY_SOCKET.into(),
        }
    }

    /// Parses the names the CLI takes (`gpu-fd`, `metadata`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "gpu-fd" => Endpoint::GpuFd,
            "metadata" => Endpoint::GpuMetadata,
            "rule-install" => Endpoint::RuleInstall,
            "rule-uninstall" => Endpoint::RuleUninstall,
            "queue-ids" => Endpoint::QueueIds,
            "registry" => Endpoint::Registry,
            _ => return None,
        })
    }
}

/// A misbehaviour to inject. "Not running" is simply not starting the mock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Accept each connection and close it at once.
    AcceptThenClose,
    /// Answer correctly, but only after this long.
    Delay(Duration),
    /// Read the request and never answer (a wedged daemon); the connection
    /// stays open until the client leaves or the mock stops.
    Hang,
    /// Send one byte of the 2-byte length header, then close.
    MalformedLength,
    /// Announce a 32-byte payload, send 5 bytes, then close.
    TruncatedPayload,
    /// A well-framed payload that is not protobuf.
    GarbagePayload,
    /// A frame whose only field (number 7) is outside the oneof.
    UnknownOneof,
    /// `get_gpu_fd` sends this many fds in its fd message (0 or 2 are wrong).
    FdCount(usize),
    /// `get_gpu_fd` sends a pipe instead of the pool memfd.
    WrongFdKind,
    /// `get_gpu_fd` sends a memfd smaller than the advertised pool.
    ShortPool,
    /// `rx_rule_manager` answers with the daemon's error text, not `Ok.`.
    RefuseRules,
    /// Serve this many requests, then die (sockets removed, connections closed).
    DieAfter(usize),
}

impl Fault {
    /// Parses the CLI's `--fault` value, e.g. `delay-ms=3000`, `fd-count=2`.
    pub fn parse(s: &str) -> Option<Self> {
        let (name, arg) = match s.split_once('=') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let num = || arg.and_then(|a| a.parse::<u64>().ok());
        Some(match name {
            "none" => Fault::None,
            "accept-then-close" => Fault::AcceptThenClose,
            "delay-ms" => Fault::Delay(Duration::from_millis(num()?)),
            "hang" => Fault::Hang,
            "malformed-length" => Fault::MalformedLength,
            "truncated-payload" => Fault::TruncatedPayload,
            "garbage-payload" => Fault::GarbagePayload,
            "unknown-oneof" => Fault::UnknownOneof,
            "fd-count" => Fault::FdCount(usize::try_from(num()?).ok()?),
            "wrong-fd-kind" => Fault::WrongFdKind,
            "short-pool" => Fault::ShortPool,
            "refuse-rules" => Fault::RefuseRules,
            "die-after" => Fault::DieAfter(usize::try_from(num()?).ok()?),
            _ => return None,
        })
    }
}

/// What the mock serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockConfig {
    pub gpu_pci: String,
    pub pool_size: u64,
    pub align: u64,
    pub queue_ids: Vec<i32>,
    pub fault: Fault,
    /// The endpoint the fault applies to; `None` = all of them.
    pub fault_on: Option<Endpoint>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            gpu_pci: "0000:04:00.0".into(),
            pool_size: 1 << 20,
            align: 4096,
            queue_ids: vec![1, 2, 3, 4],
            fault: Fault::None,
            fault_on: None,
        }
    }
}

impl MockConfig {
    pub fn with_fault(mut self, fault: Fault, on: Option<Endpoint>) -> Self {
        self.fault = fault;
        self.fault_on = on;
        self
    }
}

struct Shared {
    prefix: PathBuf,
    config: MockConfig,
    pool: OwnedFd,
    fault: Mutex<(Fault, Option<Endpoint>)>,
    stop: AtomicBool,
    dead: AtomicBool,
    rules: Mutex<Vec<FlowRule>>,
    registered: AtomicUsize,
    served: AtomicUsize,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not wedge the mock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn fault_for(&self, ep: Endpoint) -> Fault {
        let g = lock(&self.fault);
        match g.1 {
            Some(only) if only != ep => Fault::None,
            _ => g.0.clone(),
        }
    }

    fn halted(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.dead.load(Ordering::Acquire)
    }

    fn count_request(&self) {
        let n = self.served.fetch_add(1, Ordering::AcqRel) + 1;
        if let Fault::DieAfter(limit) = lock(&self.fault).0 {
            if n >= limit {
                // A killed daemon accepts nothing more: take the sockets away before
                // anyone can observe the death, so no connect races into a half-dead listener.
                for ep in Endpoint::ALL {
                    let _ = std::fs::remove_file(
                        self.prefix.join(ep.socket_name(&self.config.gpu_pci)),
                    );
                }
                self.dead.store(true, Ordering::Release);
            }
        }
    }
}

/// The mock daemon; serves until dropped.
pub struct MockGpumemd {
    prefix: PathBuf,
    temp_dir: bool,
    config: MockConfig,
    /// The pool to serve instead of a fresh memfd (a GPU pool's fd).
    given_pool: Option<OwnedFd>,
    shared: Option<Arc<Shared>>,
    acceptor: Option<JoinHandle<()>>,
}

static TEMP_SEQ: AtomicUsize = AtomicUsize::new(0);

impl MockGpumemd {
    /// Starts on a fresh private directory, removed on drop. Kept short:
    /// socket paths must fit in 108 bytes.
    pub fn start_temp(config: MockConfig) -> io::Result<Self> {
        Self::start_temp_inner(config, None)
    }

    /// As [`MockGpumemd::start_temp`], serving `pool` (for instance a GPU
    /// pool's shareable fd, `cuda::vmm::ExportedPool::fd`) instead of a
    /// memfd; `config.pool_size` and `config.align` must describe it.
    pub fn start_temp_with_pool(config: MockConfig, pool: OwnedFd) -> io::Result<Self> {
        Self::start_temp_inner(config, Some(pool))
    }

    fn start_temp_inner(config: MockConfig, pool: Option<OwnedFd>) -> io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tcpxm-{}-{}",
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let mut m = Self::start_inner(&dir, config, pool).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        m.temp_dir = true;
        Ok(m)
    }

    /// Starts on `prefix` (which must exist), replacing stale socket files.
    pub fn start(prefix: &Path, config: MockConfig) -> io::Result<Self> {
        Self::start_inner(prefix, config, None)
    }

    fn start_inner(prefix: &Path, config: MockConfig, pool: Option<OwnedFd>) -> io::Result<Self> {
        let mut m = Self {
            prefix: prefix.to_owned(),
            temp_dir: false,
            config,
            given_pool: pool,
            shared: None,
            acceptor: None,
        };
        m.launch(m.config.fault.clone(), m.config.fault_on)?;
        Ok(m)
    }

    fn launch(&mut self, fault: Fault, fault_on: Option<Endpoint>) -> io::Result<()> {
        let cfg = self.config.clone();
        let pool = match &self.given_pool {
            Some(fd) => fd.try_clone()?,
            None => make_pool(cfg.pool_size)?,
        };
        let mut listeners = Vec::new();
        for ep in Endpoint::ALL {
            let path = self.prefix.join(ep.socket_name(&cfg.gpu_pci));
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let l = UnixListener::bind(&path)?;
            l.set_nonblocking(true)?;
            listeners.push((ep, path, l));
        }
        let shared = Arc::new(Shared {
            prefix: self.prefix.clone(),
            config: cfg,
            pool,
            fault: Mutex::new((fault, fault_on)),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            rules: Mutex::new(Vec::new()),
            registered: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            workers: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        self.acceptor = Some(
            std::thread::Builder::new()
                .name("gpumemd-mock-accept".into())
                .spawn(move || accept_loop(&s, listeners))?,
        );
        self.shared = Some(shared);
        Ok(())
    }

    /// Socket directory; give it to [`GpumemdClient::new`].
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// A client for this mock.
    pub fn client(&self, deadline: Duration) -> GpumemdClient {
        GpumemdClient::new(&self.prefix, deadline)
    }

    pub fn config(&self) -> &MockConfig {
        &self.config
    }

    /// Rules installed and not yet removed.
    pub fn installed_rules(&self) -> Vec<FlowRule> {
        self.shared
            .as_ref()
            .map(|s| lock(&s.rules).clone())
            .unwrap_or_default()
    }

    /// Clients registered now (connections that registered and are open).
    pub fn registered_clients(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(0, |s| s.registered.load(Ordering::Acquire))
    }

    /// Requests answered since the last start.
    pub fn requests_served(&self) -> usize {
        self.shared
            .as_ref()
            .map_or(0, |s| s.served.load(Ordering::Acquire))
    }

    /// Whether it serves (false after stop or a `DieAfter` death).
    pub fn is_running(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| !s.halted())
    }

    /// Changes the fault of the running mock.
    pub fn set_fault(&self, fault: Fault, on: Option<Endpoint>) {
        if let Some(s) = &self.shared {
            *lock(&s.fault) = (fault, on);
        }
    }

    /// Stops like a killed daemon: sockets removed, connections closed,
    /// state lost. Returns once every mock thread has exited.
    pub fn stop(&mut self) {
        if let Some(s) = self.shared.take() {
            s.stop.store(true, Ordering::Release);
            if let Some(a) = self.acceptor.take() {
                let _ = a.join();
            }
            let workers = std::mem::take(&mut *lock(&s.workers));
            for w in workers {
                let _ = w.join();
            }
            for ep in Endpoint::ALL {
                let _ = std::fs::remove_file(s.prefix.join(ep.socket_name(&s.config.gpu_pci)));
            }
        }
    }

    /// Stops and starts again on the same prefix, healthy (no fault) and
    /// with fresh state and a fresh pool (the same given one), like a
    /// restarted daemon.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.launch(Fault::None, None)
    }
}

impl Drop for MockGpumemd {
    fn drop(&mut self) {
        self.stop();
        if self.temp_dir {
            let _ = std::fs::remove_dir_all(&self.prefix);
        }
    }
}

fn make_pool(size: u64) -> io::Result<OwnedFd> {
    let name = CString::new("tcpx-mock-rxpool").map_err(io::Error::other)?;
    let fd = memfd_create(
        &name,
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )?;
    let len = i64::try_from(size).map_err(io::Error::other)?;
    nix::unistd::ftruncate(&fd, len)?;
    Ok(fd)
}

fn accept_loop(s: &Arc<Shared>, listeners: Vec<(Endpoint, PathBuf, UnixListener)>) {
    while !s.halted() {
        let mut pfds: Vec<PollFd> = listeners
            .iter()
            .map(|(_, _, l)| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        let tick = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::ZERO);
        if poll(&mut pfds, tick).is_err() {
            std::thread::sleep(TICK);
        }
        drop(pfds);
        for (ep, path, l) in &listeners {
            while let Ok((stream, _)) = l.accept() {
                let fault = s.fault_for(*ep);
                if fault == Fault::AcceptThenClose {
                    drop(stream);
                    continue;
                }
                let (s2, ep, path) = (Arc::clone(s), *ep, path.clone());
                let spawned = std::thread::Builder::new()
                    .name("gpumemd-mock-conn".into())
                    .spawn(move || serve_conn(&s2, ep, &path, stream));
                let mut workers = lock(&s.workers);
                workers.retain(|w| !w.is_finished());
                if let Ok(h) = spawned {
                    workers.push(h);
                }
            }
        }
    }
    // Dead or stopped: a dead daemon leaves no sockets behind.
    for (_, path, _) in &listeners {
        let _ = std::fs::remove_file(path);
    }
}

/// Waits until `stream` is readable; false when the mock halts or idles out.
fn wait_readable(s: &Shared, stream: &UnixStream, idle_limit: Option<Duration>) -> bool {
    let since = Instant::now();
    let tick = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::ZERO);
    loop {
        if s.halted() || idle_limit.is_some_and(|l| since.elapsed() > l) {
            return false;
        }
        let mut pfd = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        match poll(&mut pfd, tick) {
            Ok(n) if n > 0 => return true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// Sleeps `d` in ticks; false if the mock halted meanwhile.
fn sleep_unless_halted(s: &Shared, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if s.halted() {
            return false;
        }
        std::thread::sleep(TICK.min(until.saturating_duration_since(Instant::now())));
    }
    !s.halted()
}

fn serve_conn(s: &Shared, ep: Endpoint, path: &Path, stream: UnixStream) {
    let idle = if ep == Endpoint::Registry {
        None
    } else {
        Some(IDLE_LIMIT)
    };
    let mut conn = Conn::from_stream(stream, path, "mock serve", REQUEST_BUDGET);
    let mut registered = false;
    while wait_readable(s, conn.stream(), idle) {
        conn.restart_clock("mock serve", REQUEST_BUDGET);
        let Ok(Received::Proto(req)) = conn.recv() else {
            break; // client went away, or sent fds / garbage
        };
        let fault = s.fault_for(ep);
        if fault == Fault::Hang {
            wait_readable(s, conn.stream(), None); // the client's EOF, or the mock's stop
            break;
        }
        if let Fault::Delay(d) = fault {
            if !sleep_unless_halted(s, d) {
                break;
            }
        }
        conn.restart_clock("mock reply", REQUEST_BUDGET);
        let keep_open = match reply_with_fault(s, &mut conn, &fault) {
            Some(keep) => keep,
            None => answer(s, ep, &mut conn, &req, &fault, &mut registered),
        };
        s.count_request();
        if !keep_open {
            break;
        }
    }
    if registered {
        s.registered.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Framing faults, the same on every endpoint. `Some(keep_open)` when the
/// fault replaced the answer.
fn reply_with_fault(_s: &Shared, conn: &mut Conn, fault: &Fault) -> Option<bool> {
    let bytes: &[u8] = match fault {
        Fault::MalformedLength => &[0x00],
        Fault::TruncatedPayload => &[0x00, 0x20, 0x0a, 0x1e, b'O', b'k', b'.'],
        Fault::GarbagePayload => &[0x00, 0x03, 0xff, 0xff, 0xff],
        // Field 7, varint 1: decodes to a message with no oneof case.
        Fault::UnknownOneof => &[0x00, 0x02, 0x38, 0x01],
        _ => return None,
    };
    let _ = conn.send_bytes(bytes);
    // Cut frames are only cut if the connection ends.
    Some(matches!(fault, Fault::GarbagePayload | Fault::UnknownOneof))
}

fn error_reply(text: String, code: i32, message: &str) -> UnixSocketProto {
    UnixSocketProto {
        payload: Some(Payload::RawBytes(text.into_bytes())),
        status: Some(RpcStatus {
            code,
            message: message.into(),
        }),
    }
}

/// google.rpc codes the daemon uses.
const INVALID_ARGUMENT: i32 = 3;
const NOT_FOUND: i32 = 5;
const RESOURCE_EXHAUSTED: i32 = 8;

/// Serves one request as the real daemon would; returns whether the
/// connection stays open.
fn answer(
    s: &Shared,
    ep: Endpoint,
    conn: &mut Conn,
    req: &UnixSocketProto,
    fault: &Fault,
    registered: &mut bool,
) -> bool {
    let cfg = &s.config;
    let pci_matches = req.raw_bytes() == Some(cfg.gpu_pci.as_bytes());
    match ep {
        Endpoint::GpuFd => {
            if !pci_matches {
                // The daemon tries sendmsg(fd = -1), which fails: no answer.
                return true;
            }
            send_pool_fds(s, conn, fault);
            true
        }
        Endpoint::GpuMetadata => {
            let reply = if pci_matches {
                let md = PoolMetadata {
                    daemon_fd: s.pool.as_raw_fd(),
                    size: cfg.pool_size,
                    align: cfg.align,
                };
                UnixSocketProto::raw(md.to_bytes().to_vec())
            } else {
                error_reply(
                    "Not found.".into(),
                    INVALID_ARGUMENT,
                    "Requested GPU PCI Addr not found.",
                )
            };
            conn.send_proto(&reply).is_ok()
        }
        Endpoint::QueueIds => {
            let reply = match &req.payload {
                Some(Payload::QueueIdQuery(q)) if q.gpu_pci_addr == cfg.gpu_pci => {
                    UnixSocketProto::with(Payload::QueueIdResponse(QueueIdResponse {
                        queue_ids: cfg.queue_ids.clone(),
                    }))
                }
                Some(Payload::QueueIdQuery(q)) => {
                    let st = format!(
                        "NOT_FOUND: {} not found in gpu_to_ifname_map_",
                        q.gpu_pci_addr
                    );
                    error_reply(
                        format!("Failed to update flow steering rule, error: {st}."),
                        NOT_FOUND,
                        &st,
                    )
                }
                _ => {
                    let err = format!("Invalid Argument: {}\n", req.kind());
                    error_reply(err.clone(), INVALID_ARGUMENT, &err)
                }
            };
            let ok = matches!(reply.payload, Some(Payload::QueueIdResponse(_)));
            conn.send_proto(&reply).is_ok() && ok
        }
        Endpoint::RuleInstall | Endpoint::RuleUninstall => {
            let reply = rule_reply(s, ep == Endpoint::RuleInstall, req, fault);
            conn.send_proto(&reply).is_ok()
        }
        Endpoint::Registry => {
            let Some(Payload::ApplicationRegisterRequest(r)) = &req.payload else {
                let st = "INVALID_ARGUMENT: Invalid Application Register Request";
                let reply = error_reply(
                    format!("Failed to process request, error: {st}."),
                    INVALID_ARGUMENT,
                    st,
                );
                let _ = conn.send_proto(&reply);
                return false;
            };
            let deregister = r.register_client == Some(false);
            if !deregister && !*registered {
                *registered = true;
                s.registered.fetch_add(1, Ordering::AcqRel);
            }
            let sent = conn.send_proto(&UnixSocketProto::raw(OK_REPLY)).is_ok();
            // Deregistration ends the connection (the daemon sets fin).
            sent && !deregister
        }
    }
}

fn send_pool_fds(s: &Shared, conn: &mut Conn, fault: &Fault) {
    let extra: Option<OwnedFd> = match fault {
        Fault::WrongFdKind | Fault::FdCount(_) => nix::unistd::pipe().ok().map(|(r, _w)| r),
        Fault::ShortPool => make_pool(s.config.pool_size / 2).ok(),
        _ => None,
    };
    let fds: Vec<BorrowedFd<'_>> = match (fault, &extra) {
        (Fault::WrongFdKind | Fault::ShortPool, Some(x)) => vec![x.as_fd()],
        (Fault::FdCount(n), x) => {
            let mut v = Vec::new();
            for i in 0..*n {
                match (i, x) {
                    (0, _) | (_, None) => v.push(s.pool.as_fd()),
                    (_, Some(x)) => v.push(x.as_fd()),
                }
            }
            v
        }
        _ => vec![s.pool.as_fd()],
    };
    let _ = conn.send_fds(&fds);
}

fn rule_reply(s: &Shared, install: bool, req: &UnixSocketProto, fault: &Fault) -> UnixSocketProto {
    let invalid = || {
        let st = "INVALID_ARGUMENT: Invalid Flow Steering Request";
        error_reply(
            format!("Failed to update flow steering rule, error: {st}."),
            INVALID_ARGUMENT,
            st,
        )
    };
    let Some(Payload::FlowSteerRuleRequest(fsr)) = &req.payload else {
        return invalid();
    };
    let Some(rule) = FlowRule::from_proto(fsr) else {
        return invalid();
    };
    if let Some(pci) = rule
        .gpu_pci_addr
        .as_deref()
        .filter(|p| *p != s.config.gpu_pci)
    {
        let st = format!("NOT_FOUND: {pci} not found in gpu_to_ifname_map_");
        return error_reply(
            format!("Failed to update flow steering rule, error: {st}."),
            NOT_FOUND,
            &st,
        );
    }
    if install && *fault == Fault::RefuseRules {
        let st = "RESOURCE_EXHAUSTED: No more rx rules available for NIC: mock0";
        return error_reply(
            format!("Failed to update flow steering rule, error: {st}."),
            RESOURCE_EXHAUSTED,
            st,
        );
    }
    // The daemon keys rules by the 4-tuple: installing twice is a no-op,
    // removing an unknown rule still answers Ok.
    let mut rules = lock(&s.rules);
    let same = |r: &FlowRule| r.src == rule.src && r.dst == rule.dst;
    if install {
        if !rules.iter().any(same) {
            rules.push(rule);
        }
    } else {
        rules.retain(|r| !same(r));
    }
    UnixSocketProto::raw(OK_REPLY)
}

/// Counts of the mock's socket files, for tests that check cleanup.
pub fn socket_files(prefix: &Path, gpu_pci: &str) -> HashMap<Endpoint, bool> {
    Endpoint::ALL
        .iter()
        .map(|ep| (*ep, prefix.join(ep.socket_name(gpu_pci)).exists()))
        .collect()
}
