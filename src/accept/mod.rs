//! `ListenComm`: the listener side of connection setup.
//!
//! Built for hostile input (a flood of idle or garbage connections, fd
//! exhaustion): half-open connections are capped per listener
//! (`Config::max_half_open`) and the oldest is shed first, at the cap or
//! when accept(2) runs out of fds; accept(2)'s transient errors back off
//! instead of failing `accept`; the hello deadline runs on every call,
//! whatever accept(2) says.

mod pressure;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, Socket, Type};

use crate::comm::RecvComm;
use crate::config::{MAX_NICS, MAX_SOCKETS_PER_NIC};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::net::{read_some, write_handshake, Net, NetInner};
use crate::wire::{
    decode_prefix, Hello, Reject, Role, Welcome, HELLO_LEN, PREFIX_LEN, REJECT_VERSION, VERSION,
};
use pressure::{classify, AcceptError, Complaint, Complaints, Fresh, HalfOpen, Partial, Shed};

impl Net {
    /// Listens on device `dev`; the handle goes to the peer out of band.
    pub fn listen(&self, dev: usize) -> Result<(Handle, ListenComm)> {
        crate::connect::sweep_abandoned();
        let d = self.device(dev)?;
        let backlog = kernel_queue(self.inner.cfg.max_half_open);
        let mut listeners = Vec::new();
        for (nic, dv) in self.inner.devices.iter().enumerate() {
            listeners.push((bind_listener(dv.addr, backlog)?, Some(nic)));
        }
        let ctrl_ip = self.inner.ctrl_ip.unwrap_or(d.addr);
        let ctrl_at = match self.inner.devices.iter().position(|x| x.addr == ctrl_ip) {
            Some(i) => i,
            None => {
                listeners.push((bind_listener(ctrl_ip, backlog)?, None));
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
            listen_id: handle.listen_id,
            listeners,
            data_addrs,
            half: HalfOpen::default(),
            steering: Vec::new(),
            paused_until: None,
            backoff: FIRST_BACKOFF,
            complaints: Complaints::default(),
        };
        Ok((handle, comm))
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

/// The kernel's accept queue for a listener that holds `max_half_open`
/// connections itself: several times that, so that a flood waits in the queue
/// to be shed rather than filling it, which drops everyone's SYNs (a dropped
/// SYN costs a peer a 1 s retransmission). The kernel clamps it to
/// `net.core.somaxconn`.
fn kernel_queue(max_half_open: usize) -> usize {
    max_half_open.saturating_mul(4).max(1024)
}

/// A listening socket whose kernel queue holds `backlog` connections.
pub(crate) fn bind_listener(ip: IpAddr, backlog: usize) -> Result<TcpListener> {
    let addr = SocketAddr::new(ip, 0);
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| Error::io("socket", e))?;
    s.set_reuse_address(true)
        .map_err(|e| Error::io("SO_REUSEADDR", e))?;
    s.bind(&addr.into())
        .map_err(|e| Error::io("bind listener", e))?;
    s.listen(backlog.clamp(128, i32::MAX as usize) as i32)
        .map_err(|e| Error::io("listen", e))?;
    s.set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    Ok(s.into())
}

/// How long an accepted socket may take to present its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause of accept(2) after a resource error that shedding
/// cannot relieve (the fds are held by comms, not by half-open connections).
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// accept(2) errors of dying connections tolerated in one call.
const RETRIES_PER_CALL: usize = 64;

/// A listening endpoint (from `Net::listen`).
pub struct ListenComm {
    net: Arc<NetInner>,
    secret: [u8; 16],
    listen_id: u64,
    /// Per data NIC (index = NIC), then possibly a control-only listener.
    listeners: Vec<(TcpListener, Option<usize>)>,
    data_addrs: Vec<SocketAddr>,
    half: HalfOpen,
    /// Accepted comms waiting out `flow_steering_wait`.
    steering: Vec<(Instant, RecvComm)>,
    /// accept(2) is not called again before this (after ENOBUFS, or EMFILE
    /// with nothing to shed).
    paused_until: Option<Instant>,
    backoff: Duration,
    complaints: Complaints,
}

impl ListenComm {
    /// Accepts the next connection. `Ok(None)`: none ready yet, call again.
    /// Sockets that fail the handshake (wrong secret, garbage, silence) are
    /// dropped without disturbing other connections; so are the oldest
    /// half-open ones under a flood (see the module doc).
    pub fn accept(&mut self) -> Result<Option<RecvComm>> {
        let now = Instant::now();
        crate::connect::sweep_abandoned();
        if let Some(i) = self.steering.iter().position(|(at, _)| *at <= now) {
            return Ok(Some(self.steering.swap_remove(i).1));
        }
        self.expire_partials(now);
        let broken = self.accept_new(now);
        if let Some(comm) = self.read_hellos(now)? {
            return Ok(Some(comm));
        }
        match broken {
            Some(e) => Err(e),
            None => Ok(None),
        }
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

    /// Takes what the kernel has queued into the half-open table, shedding
    /// the oldest at the cap or when out of fds. Never fails the call
    /// itself: a broken listening socket is returned for after the hello pass.
    fn accept_new(&mut self, now: Instant) -> Option<Error> {
        if self.paused_until.is_some_and(|t| now < t) {
            return None;
        }
        self.paused_until = None;
        let cap = self.net.cfg.max_half_open;
        let mark = self.half.mark();
        let mut retries = 0;
        for i in 0..self.listeners.len() {
            loop {
                if self.half.len() >= cap {
                    if !queued(&self.listeners[i].0) {
                        break;
                    }
                    if !self.shed(now, mark, "a new connection at the half-open cap") {
                        return None; // the rest waits in the kernel's queue
                    }
                }
                let (l, nic) = &self.listeners[i];
                let e = match l.accept() {
                    Ok((stream, _)) => {
                        self.backoff = FIRST_BACKOFF;
                        if stream.set_nonblocking(true).is_ok() {
                            self.half.push(stream, *nic, now + HELLO_TIMEOUT, HELLO_LEN);
                        }
                        continue;
                    }
                    Err(e) => e,
                };
                match classify(&e) {
                    AcceptError::Empty => break,
                    AcceptError::Retry => {
                        retries += 1;
                        if retries > RETRIES_PER_CALL {
                            break;
                        }
                    }
                    AcceptError::OutOfFds => {
                        let at = addr(l);
                        self.complaints.warn(now, Complaint::AcceptFailed, || {
                            format!("accept on {at}: {e}; shedding the oldest half-open connections to free descriptors")
                        });
                        if !self.shed(now, mark, "a descriptor for accept") {
                            if self.half.len() == 0 {
                                self.pause(now);
                            }
                            return None;
                        }
                    }
                    AcceptError::Pressure => {
                        let at = addr(l);
                        self.complaints.warn(now, Complaint::AcceptFailed, || {
                            format!("accept on {at}: {e}; backing off")
                        });
                        self.pause(now);
                        return None;
                    }
                    AcceptError::Fatal => return Some(Error::io("accept", e)),
                }
            }
        }
        None
    }

    /// Sheds one half-open connection for `why`; false when none may go now.
    fn shed(&mut self, now: Instant, mark: u64, why: &str) -> bool {
        let cap = self.net.cfg.max_half_open;
        let what = match self.half.shed(mark) {
            Shed::Later | Shed::Nothing => return false,
            Shed::Socket => "the oldest connection that has not sent its hello".to_string(),
            Shed::Comm(id) => format!(
                "the oldest comm still waiting for data sockets ({id:#x}; raise TCPX_MAX_HALF_OPEN if this many peers connect at once)"
            ),
        };
        self.complaints.warn(now, Complaint::Shed, || {
            format!("listener: dropped {what} to make room for {why} ({cap} half-open at most)")
        });
        true
    }

    fn pause(&mut self, now: Instant) {
        self.paused_until = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Reads the Hellos that arrived; drops the silent and the refused.
    fn read_hellos(&mut self, now: Instant) -> Result<Option<RecvComm>> {
        let mut i = 0;
        while i < self.half.fresh.len() {
            let f = &mut self.half.fresh[i];
            let read = read_some(&f.stream, &mut f.buf, HELLO_LEN);
            if let Some(v) = crate::wire::foreign_version(&f.buf) {
                // Told before it waits for a Hello length of our version.
                let _ = write_handshake(
                    &f.stream,
                    &Reject {
                        reason: REJECT_VERSION,
                    }
                    .encode(),
                );
                self.half.fresh.remove(i);
                self.complaints.warn(now, Complaint::Refused, || {
                    format!("listener: refused a tcpx-rs peer that speaks wire version {v} (we speak {VERSION}); run the same release on both sides")
                });
                continue;
            }
            // Garbage is dropped as soon as its first header bytes show it.
            let read = match read {
                Ok(false) if f.buf.len() >= PREFIX_LEN => decode_prefix(&f.buf).map(|_| false),
                r => r,
            };
            match read {
                Ok(false) if now < f.deadline => i += 1,
                Ok(false) => {
                    self.half.fresh.remove(i);
                    self.complaints.warn(now, Complaint::NoHello, || {
                        format!("listener: dropped a connection that sent no hello within {HELLO_TIMEOUT:?}")
                    });
                }
                Err(e) => {
                    tracing::debug!("dropping a connection during its hello: {e}");
                    self.half.fresh.remove(i);
                }
                Ok(true) => {
                    let Some(f) = self.half.fresh.remove(i) else {
                        break;
                    };
                    match self.on_hello(f) {
                        Ok(Some(comm)) => return Ok(Some(comm)),
                        Ok(None) => {}
                        // Our own side failed (flow steering under `require`): the caller must know.
                        Err(e @ (Error::Gpumemd(_) | Error::Unsupported(_))) => return Err(e),
                        Err(e) => self.complaints.warn(now, Complaint::Refused, || {
                            format!("listener: refused a connection: {e}")
                        }),
                    }
                }
            }
        }
        Ok(None)
    }

    fn expire_partials(&mut self, now: Instant) {
        let timeout = self.net.cfg.handshake_timeout;
        self.half.partial.retain(|id, p| {
            let keep = now < p.deadline;
            if !keep {
                tracing::warn!(
                    comm_id = id,
                    "dropping a connection whose data sockets did not arrive within {timeout:?}"
                );
            }
            keep
        });
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
                    inline_kib: self.net.inline_kib(),
                    peer_timeout_ms: self.net.timeout_ms(),
                };
                write_handshake(&f.stream, &welcome.encode(&self.data_addrs))?;
                self.half.partial.insert(
                    comm_id,
                    Partial {
                        ctrl: f.stream,
                        hello: h,
                        data: (0..h.n_data).map(|_| None).collect(),
                        deadline: Instant::now() + self.net.cfg.handshake_timeout,
                        seq: f.seq,
                    },
                );
                Ok(None)
            }
            Role::Data { index } => {
                let nic = f.nic.ok_or_else(|| {
                    Error::Protocol("data socket on the control-only listener".into())
                })?;
                let p = self.half.partial.get_mut(&h.comm_id).ok_or_else(|| {
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
                let Some(p) = self.half.partial.remove(&h.comm_id) else {
                    return Ok(None);
                };
                self.net.tune(&p.ctrl, false)?;
                let data: Vec<(usize, TcpStream)> = p.data.into_iter().flatten().collect();
                for (_, stream) in &data {
                    self.net.tune(stream, true)?;
                }
                let flows = self.net.paths.steer(&data)?;
                let agreed = self.net.agreed(
                    p.hello.peer_timeout_ms,
                    p.hello.inline_threshold as usize,
                    self.net.inline_kib() as usize * 1024,
                );
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

impl Drop for ListenComm {
    /// Half-open connections close with it, and so do this process's
    /// `connect_bytes` in progress into it, which could never finish now.
    fn drop(&mut self) {
        crate::connect::end_connects_into(self.listen_id);
    }
}

fn addr(l: &TcpListener) -> String {
    l.local_addr()
        .map_or_else(|e| format!("? ({e})"), |a| a.to_string())
}

/// Whether a connection waits in `l`'s accept queue.
fn queued(l: &TcpListener) -> bool {
    let mut p = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
}

pub(crate) fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
