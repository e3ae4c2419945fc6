//! `ListenComm`: the listener side of connection setup.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::comm::RecvComm;
use crate::config::{MAX_NICS, MAX_SOCKETS_PER_NIC};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::net::{read_some, write_handshake, Net, NetInner};
use crate::wire::{Hello, Role, Welcome, HELLO_LEN};

impl Net {
    /// Listens on device `dev`; the handle goes to the peer out of band.
    pub fn listen(&self, dev: usize) -> Result<(Handle, ListenComm)> {
        crate::connect::sweep_abandoned();
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
            listen_id: handle.listen_id,
            listeners,
            data_addrs,
            fresh: Vec::new(),
            partial: HashMap::new(),
            steering: Vec::new(),
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

fn bind_listener(ip: IpAddr) -> Result<TcpListener> {
    let l = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| Error::io("bind listener", e))?;
    l.set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    Ok(l)
}

struct Fresh {
    stream: TcpStream,
    nic: Option<usize>,
    buf: Vec<u8>,
    deadline: Instant,
}

struct Partial {
    ctrl: TcpStream,
    data: Vec<Option<(usize, TcpStream)>>,
    deadline: Instant,
}

/// How long an accepted socket may take to present its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A listening endpoint (from `Net::listen`).
pub struct ListenComm {
    net: Arc<NetInner>,
    secret: [u8; 16],
    listen_id: u64,
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
        crate::connect::sweep_abandoned();
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
            match read_some(&f.stream, &mut f.buf, HELLO_LEN) {
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
                write_handshake(&f.stream, &Welcome::encode(comm_id, &self.data_addrs))?;
                self.partial.insert(
                    comm_id,
                    Partial {
                        ctrl: f.stream,
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
                self.net.tune(&p.ctrl)?;
                let data: Vec<(usize, TcpStream)> = p.data.into_iter().flatten().collect();
                let flows = match &self.net.gpumemd {
                    Some(g) => g.steer(&data.iter().map(|(_, s)| s).collect::<Vec<_>>())?,
                    None => Vec::new(),
                };
                let mut socks = Vec::with_capacity(data.len());
                for (nic, stream) in data {
                    self.net.tune(&stream)?;
                    socks.push(self.net.add_data_socket(nic, stream));
                }
                let comm = RecvComm::new(self.net.clone(), p.ctrl, socks, flows)?;
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

fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
