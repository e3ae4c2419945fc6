//! Connecting a retired data socket again, in the background.
//!
//! The receiver drives it: the listener of the comm may be gone by then
//! (NCCL closes listen comms once accepted), so after the sender retires
//! socket `i` the receiver opens a listening socket of its own on that
//! socket's NIC and invites the sender with a Dial (its address, the next
//! generation, a random token). The sender connects from its NIC for
//! socket `i` and sends a data Hello whose secret is the token and whose
//! comm id is the generation; then both ends use it as socket `i` again.
//! An invitation nobody took within `WINDOW` is withdrawn; the next
//! follows after a wait that doubles from `Config::reconnect` up to
//! `MAX_WAIT`. Both ends poll their side from their comm's progress (ticks
//! included: the comm is due at once while a connection is half made).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::Socket;

use super::CommBase;
use crate::accept::{bind_listener, constant_time_eq};
use crate::connect::{connected, start_connect};
use crate::engine::CommLink;
use crate::error::{Error, Result};
use crate::net::{read_some, write_handshake};
use crate::wire::{Dial, Hello, Role, HELLO_LEN};

/// How long an invitation stands, and a connection may take to be made.
const WINDOW: Duration = Duration::from_secs(5);
/// Longest wait between invitations.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The receiver's side: per retired socket, when to invite, or the open
/// invitation.
pub(super) struct Offers {
    first: Option<Duration>,
    slots: Vec<Offer>,
}

enum Offer {
    None,
    /// Invite at `at`; the wait after a withdrawn invitation is `wait`.
    Later {
        at: Instant,
        wait: Duration,
    },
    Open(Box<Open>),
}

struct Open {
    listener: TcpListener,
    gen: u32,
    token: [u8; 16],
    until: Instant,
    wait: Duration,
    /// Connections that have not sent their whole Hello yet.
    fresh: Vec<(TcpStream, Vec<u8>)>,
}

impl Offers {
    /// `first`: the first wait (`None`: never reconnect).
    pub fn new(n: usize, first: Option<Duration>) -> Self {
        Offers {
            first,
            slots: (0..n).map(|_| Offer::None).collect(),
        }
    }

    /// No invitation pending or open.
    pub fn idle(&self) -> bool {
        self.slots.iter().all(|s| matches!(s, Offer::None))
    }

    /// Socket `index` was retired: invite a reconnect after the first wait.
    pub fn retired(&mut self, index: usize, now: Instant) {
        if let (Some(wait), Some(s)) = (self.first, self.slots.get_mut(index)) {
            *s = Offer::Later {
                at: now + wait,
                wait,
            };
        }
    }

    /// When the comm must look again (`None`: no invitation pending).
    pub fn due(&self, now: Instant) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Offer::None => None,
                Offer::Later { at, .. } => Some(*at),
                Offer::Open(_) => Some(now),
            })
            .min()
    }

    /// Opens invitations that are due (each to be sent as a Dial), takes in
    /// connections that answered one (put in place by `revive`), and
    /// withdraws those that expired.
    pub fn poll(
        &mut self,
        base: &CommBase,
        link: &Arc<dyn CommLink>,
        now: Instant,
        dial: &mut impl FnMut(&Dial),
    ) {
        for index in 0..self.slots.len() {
            let next = match std::mem::replace(&mut self.slots[index], Offer::None) {
                Offer::None => Offer::None,
                Offer::Later { at, wait } if now < at => Offer::Later { at, wait },
                Offer::Later { wait, .. } => match invite(base, index, wait, now) {
                    Ok((open, d)) => {
                        dial(&d);
                        Offer::Open(open)
                    }
                    Err(e) => {
                        tracing::debug!(socket = index, "no reconnect invitation: {e}");
                        later(now, wait)
                    }
                },
                Offer::Open(mut open) => match open.take(index) {
                    Some(stream) => {
                        if base.revive(index, stream, link, true, open.gen) {
                            tracing::info!(socket = index, "data socket {index} connected again");
                        }
                        Offer::None
                    }
                    None if now >= open.until => later(now, open.wait),
                    None => Offer::Open(open),
                },
            };
            self.slots[index] = next;
        }
    }
}

/// The invitation after one withdrawn: twice the wait, at most `MAX_WAIT`.
fn later(now: Instant, wait: Duration) -> Offer {
    let wait = (wait * 2).min(MAX_WAIT);
    Offer::Later {
        at: now + wait,
        wait,
    }
}

/// Listens on the NIC of socket `index` for its next generation.
fn invite(
    base: &CommBase,
    index: usize,
    wait: Duration,
    now: Instant,
) -> Result<(Box<Open>, Dial)> {
    let (nic, gen) = base
        .slot_state(index)
        .ok_or_else(|| Error::InvalidArgument(format!("no data socket {index}")))?;
    let ip = base.net.devices[nic].addr;
    let listener = bind_listener(ip, 1)?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("getsockname", e))?;
    let token: [u8; 16] = rand::random();
    let gen = gen.wrapping_add(1);
    let d = Dial {
        index: index as u16,
        generation: gen,
        token,
        addr,
    };
    let open = Open {
        listener,
        gen,
        token,
        until: now + WINDOW,
        wait,
        fresh: Vec::new(),
    };
    Ok((Box::new(open), d))
}

impl Open {
    /// A connection that presented the invitation's Hello, if one did.
    fn take(&mut self, index: usize) -> Option<TcpStream> {
        while let Ok((s, _)) = self.listener.accept() {
            if s.set_nonblocking(true).is_ok() {
                self.fresh.push((s, Vec::with_capacity(HELLO_LEN)));
            }
        }
        let mut i = 0;
        while i < self.fresh.len() {
            let (s, buf) = &mut self.fresh[i];
            match read_some(s, buf, HELLO_LEN) {
                Ok(false) => i += 1,
                Ok(true) => {
                    let (s, buf) = self.fresh.swap_remove(i);
                    let ok = Hello::decode(&buf).is_ok_and(|h| {
                        h.role
                            == Role::Data {
                                index: index as u16,
                            }
                            && h.comm_id == self.gen as u64
                            && constant_time_eq(&h.secret, &self.token)
                    });
                    if ok {
                        return Some(s);
                    }
                    tracing::warn!(socket = index, "refused a reconnect with a wrong hello");
                }
                Err(_) => {
                    self.fresh.swap_remove(i);
                }
            }
        }
        None
    }
}

/// The sender's side: per socket, a connection being made for an
/// invitation.
pub(super) struct Dials {
    slots: Vec<Option<Dialing>>,
}

struct Dialing {
    sock: Socket,
    to: SocketAddr,
    gen: u32,
    token: [u8; 16],
    until: Instant,
}

impl Dials {
    pub fn new(n: usize) -> Self {
        Dials {
            slots: (0..n).map(|_| None).collect(),
        }
    }

    /// The receiver invites socket `d.index` back: connect from its NIC
    /// (an invitation for a socket in use, or an older one, is ignored).
    pub fn invited(&mut self, base: &CommBase, d: &Dial, now: Instant) -> Result<()> {
        let index = d.index as usize;
        let Some((nic, gen)) = base.slot_state(index) else {
            return Err(Error::Protocol(format!(
                "reconnect of data socket {index}, of {}",
                base.n_data()
            )));
        };
        if base.is_live(index) || d.generation <= gen {
            return Ok(());
        }
        let sock = start_connect(base.net.devices[nic].addr, d.addr)?;
        self.slots[index] = Some(Dialing {
            sock,
            to: d.addr,
            gen: d.generation,
            token: d.token,
            until: now + WINDOW,
        });
        Ok(())
    }

    /// Whether a connection is being made (the comm is then due at once).
    pub fn pending(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    /// Finishes connections that are made: the Hello goes out and the
    /// socket is put in place; the index and generation of each.
    pub fn poll(
        &mut self,
        base: &CommBase,
        link: &Arc<dyn CommLink>,
        now: Instant,
    ) -> Vec<(usize, u32)> {
        let mut done = Vec::new();
        for index in 0..self.slots.len() {
            let Some(d) = self.slots[index].take() else {
                continue;
            };
            match connected(&d.sock, d.to) {
                Ok(true) => match hello(d.sock, index, d.gen, d.token) {
                    Ok(stream) => {
                        if base.revive(index, stream, link, false, d.gen) {
                            tracing::info!(socket = index, "data socket {index} connected again");
                            done.push((index, d.gen));
                        }
                    }
                    Err(e) => tracing::debug!(socket = index, "reconnect failed: {e}"),
                },
                Ok(false) if now < d.until => self.slots[index] = Some(d),
                Ok(false) => tracing::debug!(socket = index, "reconnect timed out"),
                Err(e) => tracing::debug!(socket = index, "reconnect failed: {e}"),
            }
        }
        done
    }
}

/// Sends the data Hello of generation `gen` on a fresh connection.
fn hello(sock: Socket, index: usize, gen: u32, token: [u8; 16]) -> Result<TcpStream> {
    let h = Hello {
        secret: token,
        comm_id: gen as u64,
        role: Role::Data {
            index: index as u16,
        },
        n_data: 0,
        inline_threshold: 0,
        peer_timeout_ms: 0,
    };
    write_handshake(&sock, &h.encode())?;
    Ok(sock.into())
}
