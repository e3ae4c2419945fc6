//! What a listener holds before a connection becomes a comm, and how it lets
//! go under pressure: the half-open cap, shedding the oldest, accept(2)'s
//! transient errors, and complaints that cannot flood the log.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// An accepted socket that has not presented its Hello yet.
pub(super) struct Fresh {
    pub stream: TcpStream,
    pub nic: Option<usize>,
    pub buf: Vec<u8>,
    pub deadline: Instant,
    /// Arrival order: the age that decides who is shed first.
    pub seq: u64,
}

/// A comm whose control socket was welcomed, waiting for its data sockets.
pub(super) struct Partial {
    pub ctrl: TcpStream,
    /// The client's control Hello: its inline threshold and peer timeout.
    pub hello: crate::wire::Hello,
    pub data: Vec<Option<(usize, TcpStream)>>,
    pub deadline: Instant,
    /// `seq` of its control socket.
    pub seq: u64,
}

/// The half-open connections of one listener.
#[derive(Default)]
pub(super) struct HalfOpen {
    /// Oldest first (pushed in arrival order).
    pub fresh: VecDeque<Fresh>,
    pub partial: HashMap<u64, Partial>,
    next_seq: u64,
}

/// What `HalfOpen::shed` let go.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Shed {
    /// The oldest socket that had not presented a Hello.
    Socket,
    /// The oldest comm still waiting for data sockets (there was no socket to shed).
    Comm(u64),
    /// Every half-open socket arrived in this pass and has not been read yet:
    /// accept more on the next call.
    Later,
    /// Nothing is half-open.
    Nothing,
}

impl HalfOpen {
    /// Half-open connections held: what `Config::max_half_open` caps.
    pub fn len(&self) -> usize {
        self.fresh.len() + self.partial.len()
    }

    /// The `seq` the next accepted socket gets; sockets older than a pass's
    /// mark have had a chance to present their Hello.
    pub fn mark(&self) -> u64 {
        self.next_seq
    }

    pub fn push(&mut self, stream: TcpStream, nic: Option<usize>, deadline: Instant, hello: usize) {
        self.fresh.push_back(Fresh {
            stream,
            nic,
            buf: Vec::with_capacity(hello),
            deadline,
            seq: self.next_seq,
        });
        self.next_seq += 1;
    }

    /// Drops the oldest half-open connection accepted before `mark`: a socket
    /// without a Hello when there is one (strangers go before peers that
    /// knew the secret), else the oldest waiting comm. A socket accepted in
    /// the current pass is never shed before it could present its Hello.
    pub fn shed(&mut self, mark: u64) -> Shed {
        match self.fresh.front() {
            Some(f) if f.seq < mark => {
                self.fresh.pop_front();
                Shed::Socket
            }
            Some(_) => Shed::Later,
            None => match self.partial.iter().min_by_key(|(_, p)| p.seq) {
                Some((&id, _)) => {
                    self.partial.remove(&id);
                    Shed::Comm(id)
                }
                None => Shed::Nothing,
            },
        }
    }
}

/// What an accept(2) error means for the listener.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AcceptError {
    /// Nothing (more) to accept.
    Empty,
    /// A connection died in the queue, or a signal: try the next one now.
    Retry,
    /// EMFILE / ENFILE: free an fd (shed), then try again.
    OutOfFds,
    /// ENOBUFS / ENOMEM: back off and try again later.
    Pressure,
    /// The listening socket itself is broken.
    Fatal,
}

pub(super) fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => AcceptError::Empty,
        Some(libc::EMFILE | libc::ENFILE) => AcceptError::OutOfFds,
        Some(libc::ENOBUFS | libc::ENOMEM) => AcceptError::Pressure,
        // Linux hands a pending connection's network error to accept(2),
        // which must be retried like EAGAIN (accept(2), "Error handling").
        Some(
            libc::EINTR
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => AcceptError::Retry,
        _ => AcceptError::Fatal,
    }
}

/// How often one kind of complaint may reach the log.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Kinds of trouble a listener reports (`Refused` last: it sizes the table).
#[derive(Debug, Clone, Copy)]
pub(super) enum Complaint {
    AcceptFailed,
    Shed,
    NoHello,
    Refused,
}

/// Rate-limited warnings: a flood of bad connections must not flood the log.
/// The first of a kind is logged at once, later ones at most every
/// `LOG_EVERY`, with how many were not logged since.
#[derive(Default)]
pub(super) struct Complaints {
    /// Per kind: when last logged, and how many since.
    kinds: [(Option<Instant>, u64); Complaint::Refused as usize + 1],
}

impl Complaints {
    pub fn warn(&mut self, now: Instant, kind: Complaint, msg: impl FnOnce() -> String) {
        let (last, unlogged) = &mut self.kinds[kind as usize];
        if last.is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY) {
            *unlogged += 1;
            return;
        }
        match std::mem::take(unlogged) {
            0 => tracing::warn!("{}", msg()),
            n => tracing::warn!("{} ({n} more like it since the last report)", msg()),
        }
        *last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn sock(l: &TcpListener) -> TcpStream {
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.accept().unwrap().0
    }

    fn partial(l: &TcpListener, seq: u64) -> Partial {
        Partial {
            ctrl: sock(l),
            hello: crate::wire::Hello {
                secret: [1; 16],
                comm_id: 0,
                role: crate::wire::Role::Control,
                n_data: 1,
                inline_threshold: 0,
                peer_timeout_ms: 0,
            },
            data: Vec::new(),
            deadline: Instant::now(),
            seq,
        }
    }

    #[test]
    fn sheds_the_oldest_stranger_first_and_never_an_unread_one() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut h = HalfOpen::default();
        let now = Instant::now();
        h.push(sock(&l), None, now, 48);
        let comm_seq = h.mark();
        h.push(sock(&l), None, now, 48); // becomes a waiting comm
        let f = h.fresh.pop_back().unwrap();
        h.partial.insert(7, partial(&l, f.seq));
        h.push(sock(&l), None, now, 48);
        let mark = h.mark();
        h.push(sock(&l), None, now, 48); // this pass: not read yet
        assert_eq!(h.len(), 4);

        assert_eq!(h.shed(mark), Shed::Socket);
        assert_eq!(
            h.fresh.front().unwrap().seq,
            comm_seq + 1,
            "the oldest went"
        );
        assert_eq!(h.shed(mark), Shed::Socket);
        assert_eq!(h.shed(mark), Shed::Later, "an unread socket stays");
        assert_eq!(h.fresh.len(), 1);
        h.fresh.clear();
        h.partial.insert(3, partial(&l, comm_seq + 10));
        assert_eq!(h.shed(mark), Shed::Comm(7), "the older comm goes first");
        assert_eq!(h.shed(mark), Shed::Comm(3));
        assert_eq!(h.shed(mark), Shed::Nothing);
    }

    #[test]
    fn accept_errors_are_classified() {
        let c = |n| classify(&io::Error::from_raw_os_error(n));
        assert_eq!(c(libc::EAGAIN), AcceptError::Empty);
        assert_eq!(c(libc::EMFILE), AcceptError::OutOfFds);
        assert_eq!(c(libc::ENFILE), AcceptError::OutOfFds);
        assert_eq!(c(libc::ENOBUFS), AcceptError::Pressure);
        assert_eq!(c(libc::ENOMEM), AcceptError::Pressure);
        assert_eq!(c(libc::ECONNABORTED), AcceptError::Retry);
        assert_eq!(c(libc::EINTR), AcceptError::Retry);
        assert_eq!(c(libc::EBADF), AcceptError::Fatal);
        assert_eq!(c(libc::EINVAL), AcceptError::Fatal);
    }
}
