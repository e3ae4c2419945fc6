//! The gpumemd client: RX pool import, queue ids, flow-steering rules and
//! the application registration, each with a deadline.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::{fstat, SFlag};

use super::conn::Conn;
use super::error::{FrameError, GpumemdError};
use super::frame::PoolMetadata;
use super::proto::{
    ApplicationRegisterRequest, FlowSteerNtupleProto, FlowSteerRuleRequest, Payload, QueueIdQuery,
    SocketAddress, UnixSocketProto, TCP_V4_FLOW, TCP_V6_FLOW,
};
use super::{
    fd_socket_name, metadata_socket_name, APP_REGISTRY_SOCKET, QUEUE_IDS_SOCKET,
    RULE_INSTALL_SOCKET, RULE_UNINSTALL_SOCKET,
};

/// The reply that means success for rules and registration.
pub const OK_REPLY: &[u8] = b"Ok.";

/// Environment variable naming the daemon's socket directory.
pub const PREFIX_ENV: &str = "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX";
/// The original's default socket directory.
pub const DEFAULT_PREFIX: &str = "/tmp";
/// Default budget of one exchange.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);

/// Talks to gpumemd under one socket directory. Cheap to clone; holds no
/// connection (each call connects, like the original).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpumemdClient {
    prefix: PathBuf,
    deadline: Duration,
}

/// A flow to steer: `src` is the remote peer, `dst` the local address of an
/// accepted data socket (the original passes peer, then local).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowRule {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// GPU whose queues should receive the flow; the daemon otherwise picks
    /// the first GPU of the NIC that owns `dst`.
    pub gpu_pci_addr: Option<String>,
    /// A specific RX queue; the daemon otherwise balances over the GPU's queues.
    pub queue_id: Option<i32>,
}

/// The imported RX pool: the shareable-memory fd and what the daemon says
/// about it.
#[derive(Debug)]
pub struct RxPool {
    pub fd: OwnedFd,
    pub metadata: PoolMetadata,
}

impl GpumemdClient {
    /// A client for the daemon under `prefix`, every exchange bounded by `deadline`.
    pub fn new(prefix: impl Into<PathBuf>, deadline: Duration) -> Self {
        let mut prefix: PathBuf = prefix.into();
        // The original strips a trailing '/'; keep "/" itself.
        while prefix.as_os_str().len() > 1 && prefix.as_os_str().as_bytes().ends_with(b"/") {
            let trimmed = &prefix.as_os_str().as_bytes()[..prefix.as_os_str().len() - 1];
            prefix = PathBuf::from(std::ffi::OsStr::from_bytes(trimmed));
        }
        Self { prefix, deadline }
    }

    /// Prefix from `NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX` (default `/tmp`).
    pub fn from_env(deadline: Duration) -> Self {
        let prefix = std::env::var_os(PREFIX_ENV)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PREFIX));
        Self::new(prefix, deadline)
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Path of one of the daemon's sockets.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.prefix.join(name)
    }

    fn connect(&self, name: &str, op: &'static str) -> Result<Conn, GpumemdError> {
        Conn::connect(&self.socket_path(name), op, self.deadline)
    }

    /// RX queue ids the daemon assigned to `gpu_pci_addr`
    /// (`<prefix>/queue_ids_by_gpu`). Also a safe liveness probe: unlike the
    /// registry socket, connecting here has no side effect in the daemon.
    pub fn queue_ids(&self, gpu_pci_addr: &str) -> Result<Vec<i32>, GpumemdError> {
        check_pci(gpu_pci_addr)?;
        let mut conn = self.connect(QUEUE_IDS_SOCKET, "queue-id query")?;
        conn.send_proto(&UnixSocketProto::with(Payload::QueueIdQuery(
            QueueIdQuery {
                gpu_pci_addr: gpu_pci_addr.to_owned(),
            },
        )))?;
        let reply = conn.recv_proto()?;
        match reply.payload {
            Some(Payload::QueueIdResponse(r)) => Ok(r.queue_ids),
            Some(Payload::RawBytes(_)) | None
                if reply.status.is_some() || reply.raw_bytes().is_some() =>
            {
                Err(refused(&conn, "queue-id query", &reply))
            }
            _ => Err(GpumemdError::Malformed {
                op: "queue-id query",
                path: conn.path().to_owned(),
                source: FrameError::UnexpectedKind {
                    expected: "queue_id_response",
                    got: reply.kind(),
                },
            }),
        }
    }

    /// The RX pool's shareable-memory fd (`<prefix>/get_gpu_fd_<pci>`).
    /// The daemon never answers for a GPU it does not serve: that shows as
    /// [`GpumemdError::TimedOut`].
    pub fn rx_pool_fd(&self, gpu_pci_addr: &str) -> Result<OwnedFd, GpumemdError> {
        check_pci(gpu_pci_addr)?;
        let mut conn = self.connect(&fd_socket_name(gpu_pci_addr), "get_gpu_fd")?;
        conn.send_proto(&UnixSocketProto::raw(gpu_pci_addr.as_bytes()))?;
        conn.recv_one_fd()
    }

    /// The pool's `{fd, size, align}` (`<prefix>/get_gpu_metadata_<pci>`).
    pub fn rx_pool_metadata(&self, gpu_pci_addr: &str) -> Result<PoolMetadata, GpumemdError> {
        const OP: &str = "get_gpu_metadata";
        check_pci(gpu_pci_addr)?;
        let mut conn = self.connect(&metadata_socket_name(gpu_pci_addr), OP)?;
        conn.send_proto(&UnixSocketProto::raw(gpu_pci_addr.as_bytes()))?;
        let reply = conn.recv_proto()?;
        let Some(raw) = reply.raw_bytes() else {
            return Err(GpumemdError::Malformed {
                op: OP,
                path: conn.path().to_owned(),
                source: FrameError::UnexpectedKind {
                    expected: "raw_bytes",
                    got: reply.kind(),
                },
            });
        };
        if reply.status.is_some() || (raw.len() != PoolMetadata::WIRE_LEN && is_text(raw)) {
            return Err(refused(&conn, OP, &reply));
        }
        let md = PoolMetadata::from_bytes(raw).map_err(|source| GpumemdError::Malformed {
            op: OP,
            path: conn.path().to_owned(),
            source,
        })?;
        if md.size == 0 || (md.align != 0 && !md.align.is_power_of_two()) {
            return Err(GpumemdError::InvalidReply {
                op: OP,
                path: conn.path().to_owned(),
                detail: format!(
                    "pool size {} / alignment {} are not usable",
                    md.size, md.align
                ),
            });
        }
        Ok(md)
    }

    /// Fetches the pool fd and metadata, in the original's order, and checks
    /// that the fd can be the pool.
    pub fn rx_pool(&self, gpu_pci_addr: &str) -> Result<RxPool, GpumemdError> {
        let fd = self.rx_pool_fd(gpu_pci_addr)?;
        let metadata = self.rx_pool_metadata(gpu_pci_addr)?;
        check_pool_fd(&fd, &metadata)?;
        Ok(RxPool { fd, metadata })
    }

    /// Installs a flow-steering rule (`<prefix>/rx_rule_manager`).
    pub fn install_rule(&self, rule: &FlowRule) -> Result<(), GpumemdError> {
        self.rule_exchange(RULE_INSTALL_SOCKET, "flow-steering rule install", rule)
    }

    /// Removes a flow-steering rule (`<prefix>/rx_rule_uninstall`).
    pub fn uninstall_rule(&self, rule: &FlowRule) -> Result<(), GpumemdError> {
        self.rule_exchange(RULE_UNINSTALL_SOCKET, "flow-steering rule uninstall", rule)
    }

    /// Installs `rule` and returns a guard that removes it when dropped.
    pub fn steer(&self, rule: FlowRule) -> Result<SteeredFlow, GpumemdError> {
        self.install_rule(&rule)?;
        Ok(SteeredFlow {
            client: self.clone(),
            rule,
            active: true,
        })
    }

    fn rule_exchange(
        &self,
        socket: &str,
        op: &'static str,
        rule: &FlowRule,
    ) -> Result<(), GpumemdError> {
        let req = rule.to_proto()?;
        let mut conn = self.connect(socket, op)?;
        conn.send_proto(&UnixSocketProto::with(Payload::FlowSteerRuleRequest(req)))?;
        let reply = conn.recv_proto()?;
        if reply.raw_bytes() == Some(OK_REPLY) {
            return Ok(());
        }
        Err(refused(&conn, op, &reply))
    }

    /// Registers this process with the daemon (`<prefix>/rxdm_application_registry`).
    /// As in the original, the registration is the open connection: the
    /// daemon counts registered clients and drops one when its connection
    /// closes. Keep the returned value alive for as long as the process uses
    /// the daemon; dropping it deregisters.
    pub fn register(&self) -> Result<Registration, GpumemdError> {
        let mut conn = self.connect(APP_REGISTRY_SOCKET, "application register")?;
        conn.send_proto(&register_msg(true))?;
        let reply = conn.recv_proto()?;
        if reply.raw_bytes() != Some(OK_REPLY) {
            return Err(refused(&conn, "application register", &reply));
        }
        Registration::start(conn, self.deadline)
    }
}

fn register_msg(register: bool) -> UnixSocketProto {
    UnixSocketProto::with(Payload::ApplicationRegisterRequest(
        ApplicationRegisterRequest {
            register_client: Some(register),
        },
    ))
}

fn refused(conn: &Conn, op: &'static str, reply: &UnixSocketProto) -> GpumemdError {
    let mut text = match reply.raw_bytes() {
        Some(raw) => String::from_utf8_lossy(raw).into_owned(),
        None => format!("<{}>", reply.kind()),
    };
    if let Some(st) = &reply.status {
        text.push_str(&format!(" (status code {}: {})", st.code, st.message));
    }
    GpumemdError::Refused {
        op,
        path: conn.path().to_owned(),
        reply: text,
    }
}

fn is_text(b: &[u8]) -> bool {
    std::str::from_utf8(b).is_ok_and(|s| s.chars().all(|c| !c.is_control() || c == '\n'))
}

/// PCI addresses become socket file names: refuse anything that could
/// escape the prefix or not fit.
fn check_pci(pci: &str) -> Result<(), GpumemdError> {
    if pci.is_empty() || pci.len() > 64 || pci.contains(['/', '\0']) {
        return Err(GpumemdError::InvalidArgument(format!(
            "{pci:?} is not a GPU PCI address (expected e.g. 0000:04:00.0)"
        )));
    }
    Ok(())
}

/// Rejects descriptors that cannot be a memory pool. A memfd (the mock, or
/// any regular file) must hold at least `size` bytes; a CUDA shareable
/// handle is not a regular file and cannot be sized, so it passes.
pub fn check_pool_fd(fd: &OwnedFd, md: &PoolMetadata) -> Result<(), GpumemdError> {
    let st = fstat(fd.as_raw_fd()).map_err(|e| GpumemdError::BadPoolFd {
        detail: format!("fstat failed: {e}"),
    })?;
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if kind == SFlag::S_IFREG {
        let len = u64::try_from(st.st_size).unwrap_or(0);
        if len < md.size {
            return Err(GpumemdError::BadPoolFd {
                detail: format!(
                    "the memory file holds {len} bytes but the pool is {} bytes",
                    md.size
                ),
            });
        }
        return Ok(());
    }
    for (bad, name) in [
        (SFlag::S_IFIFO, "a pipe"),
        (SFlag::S_IFSOCK, "a socket"),
        (SFlag::S_IFDIR, "a directory"),
        (SFlag::S_IFBLK, "a block device"),
        (SFlag::S_IFLNK, "a symlink"),
    ] {
        if kind == bad {
            return Err(GpumemdError::BadPoolFd {
                detail: format!("it is {name}, not a memory handle"),
            });
        }
    }
    Ok(())
}

impl FlowRule {
    /// The rule for an accepted data socket: traffic from `peer` to `local`.
    pub fn for_accepted(local: SocketAddr, peer: SocketAddr) -> Self {
        Self {
            src: peer,
            dst: local,
            gpu_pci_addr: None,
            queue_id: None,
        }
    }

    pub fn with_gpu(mut self, gpu_pci_addr: impl Into<String>) -> Self {
        self.gpu_pci_addr = Some(gpu_pci_addr.into());
        self
    }

    pub fn with_queue(mut self, queue_id: i32) -> Self {
        self.queue_id = Some(queue_id);
        self
    }

    /// The request the original sends: flow type, both addresses, and the
    /// GPU / queue only when given.
    pub fn to_proto(&self) -> Result<FlowSteerRuleRequest, GpumemdError> {
        let flow_type = match (self.src, self.dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => TCP_V4_FLOW,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => TCP_V6_FLOW,
            _ => {
                return Err(GpumemdError::InvalidArgument(format!(
                    "flow {} -> {} mixes IPv4 and IPv6",
                    self.src, self.dst
                )))
            }
        };
        if let Some(pci) = &self.gpu_pci_addr {
            check_pci(pci)?;
        }
        let addr = |a: SocketAddr| SocketAddress {
            ip_address: Some(a.ip().to_string()),
            port: Some(i32::from(a.port())),
        };
        Ok(FlowSteerRuleRequest {
            flow_steer_ntuple: Some(FlowSteerNtupleProto {
                flow_type: Some(flow_type),
                src: Some(addr(self.src)),
                dst: Some(addr(self.dst)),
            }),
            queue_id: self.queue_id.filter(|q| *q >= 0),
            gpu_pci_addr: self.gpu_pci_addr.clone(),
        })
    }

    /// Parses a request back (the mock's side). `None` when incomplete.
    pub fn from_proto(req: &FlowSteerRuleRequest) -> Option<Self> {
        let nt = req.flow_steer_ntuple.as_ref()?;
        let addr = |a: &Option<SocketAddress>| -> Option<SocketAddr> {
            let a = a.as_ref()?;
            let ip: std::net::IpAddr = a.ip_address.as_deref()?.parse().ok()?;
            let port = u16::try_from(a.port.unwrap_or(0)).ok()?;
            Some(SocketAddr::new(ip, port))
        };
        let (src, dst) = (addr(&nt.src)?, addr(&nt.dst)?);
        let want = if src.is_ipv4() {
            TCP_V4_FLOW
        } else {
            TCP_V6_FLOW
        };
        if src.is_ipv4() != dst.is_ipv4() || nt.flow_type != Some(want) {
            return None;
        }
        Some(Self {
            src,
            dst,
            gpu_pci_addr: req.gpu_pci_addr.clone(),
            queue_id: req.queue_id,
        })
    }
}

/// An installed flow-steering rule; removed from the daemon on drop.
#[derive(Debug)]
pub struct SteeredFlow {
    client: GpumemdClient,
    rule: FlowRule,
    active: bool,
}

impl SteeredFlow {
    pub fn rule(&self) -> &FlowRule {
        &self.rule
    }

    /// Removes the rule now and reports the outcome (drop only logs it).
    pub fn withdraw(mut self) -> Result<(), GpumemdError> {
        self.active = false;
        self.client.uninstall_rule(&self.rule)
    }
}

impl Drop for SteeredFlow {
    fn drop(&mut self) {
        if self.active {
            if let Err(e) = self.client.uninstall_rule(&self.rule) {
                tracing::warn!(rule = ?self.rule, error = %e, "could not withdraw flow-steering rule");
            }
        }
    }
}

/// A live registration: the open registry connection plus a watcher thread
/// that notices when the daemon goes away. Drop deregisters.
#[derive(Debug)]
pub struct Registration {
    stream: Arc<UnixStream>,
    path: PathBuf,
    deadline: Duration,
    lost: Arc<AtomicBool>,
    /// Closing this wakes the watcher so drop can join it at once.
    stop_tx: Option<OwnedFd>,
    watcher: Option<JoinHandle<()>>,
}

impl Registration {
    fn start(conn: Conn, deadline: Duration) -> Result<Self, GpumemdError> {
        let path = conn.path().to_owned();
        let io = |source: std::io::Error| GpumemdError::Io {
            op: "application register",
            path: path.clone(),
            source: source.into(),
        };
        let stream = Arc::new(conn.into_stream());
        let (stop_rx, stop_tx) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io(e.into()))?;
        let lost = Arc::new(AtomicBool::new(false));
        let (s, l) = (Arc::clone(&stream), Arc::clone(&lost));
        let watcher = std::thread::Builder::new()
            .name("gpumemd-registration".into())
            .spawn(move || watch(&s, &stop_rx, &l))
            .map_err(io)?;
        Ok(Self {
            stream,
            path,
            deadline,
            lost,
            stop_tx: Some(stop_tx),
            watcher: Some(watcher),
        })
    }

    /// False once the daemon closed the registration (it died or restarted):
    /// pools and rules from it are gone, register again when it is back.
    pub fn is_alive(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
    }

    /// Deregisters now (`register_client = false`, expect `Ok.`) and reports
    /// the outcome; drop does the same but only logs failures.
    pub fn deregister(mut self) -> Result<(), GpumemdError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), GpumemdError> {
        self.stop_tx = None;
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if self.lost.load(Ordering::Acquire) {
            return Ok(());
        }
        self.lost.store(true, Ordering::Release);
        let stream = self.stream.try_clone().map_err(|source| GpumemdError::Io {
            op: "application deregister",
            path: self.path.clone(),
            source: source.into(),
        })?;
        let mut conn =
            Conn::from_stream(stream, &self.path, "application deregister", self.deadline);
        conn.send_proto(&register_msg(false))?;
        let reply = conn.recv_proto()?;
        if reply.raw_bytes() != Some(OK_REPLY) {
            return Err(refused(&conn, "application deregister", &reply));
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.watcher.is_some() {
            if let Err(e) = self.finish() {
                tracing::debug!(error = %e, "gpumemd deregistration failed; closing the connection deregisters too");
            }
        }
    }
}

/// Waits until the daemon closes (or writes to) the registry connection, or
/// until the stop pipe closes. The daemon never speaks first, so any event
/// on the socket means the registration is over.
fn watch(stream: &UnixStream, stop_rx: &OwnedFd, lost: &AtomicBool) {
    loop {
        let mut fds = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        let [sock, stop] = fds;
        if stop.any().unwrap_or(true) {
            return;
        }
        if sock.any().unwrap_or(true) {
            lost.store(true, Ordering::Release);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slashes_are_stripped_like_the_original() {
        assert_eq!(
            GpumemdClient::new("/run/tcpx//", DEFAULT_DEADLINE).prefix(),
            Path::new("/run/tcpx")
        );
        assert_eq!(
            GpumemdClient::new("/", DEFAULT_DEADLINE).prefix(),
            Path::new("/")
        );
        assert_eq!(
            GpumemdClient::new("/tmp", DEFAULT_DEADLINE).socket_path("rx_rule_manager"),
            Path::new("/tmp/rx_rule_manager")
        );
    }
}
