//! `Net::connect`: the client side of connection setup, and the progress
//! table behind `connect_bytes` for C hosts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};
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
                    net.tune(&stream)?;
                    let hello = Hello {
                        secret,
                        comm_id: 0,
                        role: Role::Control,
                        n_data: n_data as u16,
                    };
                    write_handshake(&stream, &hello.encode())?;
                    self.stage = Stage::Welcome {
                        stream,
                        buf: Vec::new(),
                    };
                }
                Stage::Welcome { stream, mut buf } => {
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
                        conns,
                    };
                }
                Stage::Data {
                    ctrl,
                    comm_id,
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
                        };
                        write_handshake(&c.sock, &hello.encode())?;
                        c.hello_sent = true;
                    }
                    if !all {
                        self.stage = Stage::Data {
                            ctrl,
                            comm_id,
                            conns,
                        };
                        return Ok(None);
                    }
                    let mut socks = Vec::with_capacity(conns.len());
                    for c in conns {
                        let stream: TcpStream = c.sock.into();
                        net.tune(&stream)?;
                        socks.push(net.add_data_socket(c.nic, stream));
                    }
                    return SendComm::new(net.clone(), ctrl, socks).map(Some);
                }
                Stage::Failed => {
                    return Err(Error::InvalidArgument("connect already failed".into()))
                }
            }
        }
    }
}
