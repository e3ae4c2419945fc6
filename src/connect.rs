//! `Net::connect`: the client side of connection setup, and the progress
//! table behind `connect_bytes` for C hosts.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::comm::SendComm;
use crate::error::{Error, Result};
use crate::handle::{Handle, HANDLE_SIZE, STAGE_OFFSET};
use crate::net::{read_some, write_handshake, Net, NetInner};
use crate::wire::{Hello, Role, Welcome, WELCOME_LEN};

impl Net {
    /// Connects to a listener. `Ok(None)`: not ready yet, call again with the same handle.
    pub fn connect(&self, dev: usize, handle: &mut Handle) -> Result<Option<SendComm>> {
        let d = self.device(dev)?.clone();
        if handle.stage.is_none() {
            let local = self.inner.ctrl_ip.unwrap_or(d.addr);
            let sock = start_connect(local, handle.addr)?;
            handle.stage = Some(Box::new(Connecting {
                deadline: Instant::now() + self.inner.cfg.handshake_timeout,
                stage: Stage::Ctrl {
                    sock,
                    to: handle.addr,
                },
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
    ///
    /// A connect its caller abandons holds sockets only until its handshake
    /// deadline, until its listener is closed in this process, or until this
    /// `Net` is dropped, whichever comes first. A call with that buffer within
    /// another handshake timeout then reports why the progress is gone; later
    /// ones start a new connect.
    pub fn connect_bytes(
        &self,
        dev: usize,
        bytes: &mut [u8; HANDLE_SIZE],
    ) -> Result<Option<SendComm>> {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[STAGE_OFFSET..]);
        let stage = u64::from_le_bytes(word);
        let (found, ended) = {
            let mut p = pending();
            let ended = p.sweep(Instant::now());
            let found = match p.entries.get(&stage) {
                Some(e) if e.net != self.inner.id && matches!(e.state, State::Live(_)) => None,
                _ => Some(p.entries.remove(&stage)),
            };
            (found, ended)
        };
        drop(ended); // closes the sockets of expired connects outside the lock
        let Some(prior) = found else {
            return Err(Error::InvalidArgument(
                "this handle buffer is connecting through another tcpx net; resume it there".into(),
            ));
        };
        bytes[STAGE_OFFSET..].fill(0);
        let mut h = match prior {
            Some(Entry {
                state: State::Live(h),
                ..
            }) => h,
            Some(Entry {
                state: State::Ended { error, .. },
                ..
            }) => return Err(error),
            // Zero, the caller's own bytes, or a record long forgotten: start anew.
            None => Handle::from_bytes(&bytes[..])?,
        };
        let comm = self.connect(dev, &mut h)?;
        if comm.is_none() {
            let mut p = pending();
            let id = loop {
                let id: u64 = rand::random();
                if id != 0 && !p.entries.contains_key(&id) {
                    break id;
                }
            };
            p.insert(
                id,
                Entry {
                    net: self.inner.id,
                    kept: self.inner.cfg.handshake_timeout,
                    state: State::Live(h),
                },
            );
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

pub(crate) fn start_connect(local: IpAddr, remote: SocketAddr) -> Result<Socket> {
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
pub(crate) fn connected(sock: &Socket, to: SocketAddr) -> Result<bool> {
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
        to: SocketAddr,
    },
    Welcome {
        stream: TcpStream,
        buf: Vec<u8>,
    },
    Data {
        ctrl: TcpStream,
        comm_id: u64,
        peer_timeout_ms: u32,
        /// The largest inline message of the comm (both ends' limit).
        inline_max: usize,
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
                Stage::Ctrl { sock, to } => {
                    // The target as asked: a refused socket has no peer address to tell.
                    if !connected(&sock, to)? {
                        self.stage = Stage::Ctrl { sock, to };
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
                        inline_max: (w.inline_kib as usize * 1024).min(net.cfg.inline_idle_max),
                        conns,
                    };
                }
                Stage::Data {
                    ctrl,
                    comm_id,
                    peer_timeout_ms,
                    inline_max,
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
                            inline_max,
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
                    let agreed = net.agreed(peer_timeout_ms, net.cfg.inline_threshold, inline_max);
                    return SendComm::new(net.clone(), ctrl, data, agreed).map(Some);
                }
                Stage::Failed => {
                    return Err(Error::InvalidArgument("connect already failed".into()))
                }
            }
        }
    }
}

// ------------------------------------------------- progress of connect_bytes

/// Connects in progress for C hosts, by the stage word of their handle
/// buffer. Process-wide, so that closing a listener ends the connects into it
/// from every `Net` of the process.
static PENDING: Mutex<Pending> = Mutex::new(Pending {
    entries: BTreeMap::new(),
    next_change: None,
});

fn pending() -> MutexGuard<'static, Pending> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

struct Pending {
    entries: BTreeMap<u64, Entry>,
    /// The earliest deadline or `forget_at` among the entries.
    next_change: Option<Instant>,
}

struct Entry {
    /// `NetInner::id` of the Net that started it.
    net: u64,
    /// How long an ended entry keeps its error for the caller (the handshake timeout).
    kept: Duration,
    state: State,
}

enum State {
    /// Still connecting; owns its sockets.
    Live(Handle),
    /// Ended without its caller: the sockets are closed; the next call with
    /// this stage word gets `error`; the entry itself goes at `forget_at`.
    Ended { error: Error, forget_at: Instant },
}

impl Entry {
    fn next_change(&self) -> Option<Instant> {
        match &self.state {
            State::Live(h) => h.stage.as_ref().map(|c| c.deadline),
            State::Ended { forget_at, .. } => Some(*forget_at),
        }
    }

    /// Ends a live entry with `error`; returns its sockets for closing.
    fn end(&mut self, error: Error, now: Instant) -> Option<Handle> {
        let ended = State::Ended {
            error,
            forget_at: now + self.kept,
        };
        match std::mem::replace(&mut self.state, ended) {
            State::Live(h) => Some(h),
            e @ State::Ended { .. } => {
                self.state = e;
                None
            }
        }
    }
}

impl Pending {
    fn insert(&mut self, id: u64, e: Entry) {
        self.next_change = min_opt(self.next_change, e.next_change());
        self.entries.insert(id, e);
    }

    /// Ends connects past their deadline and forgets old ended ones; returns
    /// the handles to drop (their sockets) once the lock is released.
    fn sweep(&mut self, now: Instant) -> Vec<Handle> {
        if self.next_change.is_none_or(|t| now < t) {
            return Vec::new();
        }
        let mut closed = Vec::new();
        self.entries.retain(|_, e| match &e.state {
            State::Ended { forget_at, .. } => now < *forget_at,
            State::Live(h) => {
                if h.stage.as_ref().is_none_or(|c| now > c.deadline) {
                    let timeout = Error::Timeout {
                        what: "connecting (the connect was not resumed before its deadline)".into(),
                        after_ms: e.kept.as_millis() as u64,
                    };
                    closed.extend(e.end(timeout, now));
                }
                true
            }
        });
        self.next_change = self.entries.values().filter_map(Entry::next_change).min();
        closed
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Ends expired abandoned connects (called from other setup paths too).
pub(crate) fn sweep_abandoned() {
    let ended = match PENDING.try_lock() {
        Ok(mut p) => p.sweep(Instant::now()),
        Err(TryLockError::Poisoned(p)) => p.into_inner().sweep(Instant::now()),
        Err(TryLockError::WouldBlock) => return, // its holder sweeps
    };
    drop(ended);
}

/// The listener `listen_id` was closed: connects into it can never finish.
pub(crate) fn end_connects_into(listen_id: u64) {
    let now = Instant::now();
    let mut closed = Vec::new();
    {
        let mut p = pending();
        for e in p.entries.values_mut() {
            if matches!(&e.state, State::Live(h) if h.listen_id == listen_id) {
                let lost = Error::ConnectionLost(
                    "the listener was closed (in this process) before the connect finished".into(),
                );
                closed.extend(e.end(lost, now));
            }
        }
        p.next_change = p.entries.values().filter_map(Entry::next_change).min();
    }
    drop(closed);
}

/// Net `net` is going away: its connects and their records go with it.
pub(crate) fn forget_net(net: u64) {
    let gone: BTreeMap<u64, Entry> = {
        let mut p = pending();
        let (gone, keep) = std::mem::take(&mut p.entries)
            .into_iter()
            .partition(|(_, e)| e.net == net);
        p.entries = keep;
        p.next_change = p.entries.values().filter_map(Entry::next_change).min();
        gone
    };
    drop(gone);
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
