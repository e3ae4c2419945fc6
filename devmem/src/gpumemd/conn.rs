//! One UNIX-socket exchange with a deadline: connect, send a proto frame or
//! an fd (one dummy byte + `SCM_RIGHTS`), receive one message. Shared by the
//! client and the mock daemon.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::error::{FrameError, GpumemdError};
use super::frame::{decode_payload, encode_frame, parse_header, HEADER_LEN, MAX_PAYLOAD};
use super::proto::UnixSocketProto;

/// The kernel's cap on fds per `SCM_RIGHTS` message (`SCM_MAX_FD`). Room for
/// all of them means a reply can never be truncated, so none can leak.
const MAX_FDS_PER_MSG: usize = 253;

/// One message as the original's `UnixSocketMessage`: a proto or fds.
#[derive(Debug)]
pub enum Received {
    Proto(UnixSocketProto),
    Fds(Vec<OwnedFd>),
}

/// A connected stream with the time budget of one operation.
pub struct Conn {
    stream: UnixStream,
    path: PathBuf,
    op: &'static str,
    start: Instant,
    budget: Duration,
}

impl Conn {
    /// Connects to `path`; the connect itself counts against `budget`.
    pub fn connect(path: &Path, op: &'static str, budget: Duration) -> Result<Self, GpumemdError> {
        let start = Instant::now();
        let io_err = |source: io::Error| GpumemdError::Io {
            op,
            path: path.to_owned(),
            source: source.into(),
        };
        let addr = socket2::SockAddr::unix(path).map_err(io_err)?;
        let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
            .map_err(io_err)?;
        // SO_SNDTIMEO bounds a connect that waits on a full listen backlog.
        sock.set_write_timeout(Some(nonzero(budget)))
            .map_err(io_err)?;
        if let Err(e) = sock.connect(&addr) {
            return Err(match e.raw_os_error().map(Errno::from_raw) {
                Some(Errno::ENOENT | Errno::ECONNREFUSED | Errno::ENOTDIR) => {
                    GpumemdError::DaemonAbsent {
                        path: path.to_owned(),
                        source: e.into(),
                    }
                }
                Some(Errno::EAGAIN | Errno::EINPROGRESS | Errno::ETIMEDOUT) => {
                    GpumemdError::TimedOut {
                        op,
                        after: start.elapsed(),
                    }
                }
                _ => io_err(e),
            });
        }
        let stream = UnixStream::from(OwnedFd::from(sock));
        Ok(Self {
            stream,
            path: path.to_owned(),
            op,
            start,
            budget,
        })
    }

    /// Wraps an accepted stream (the mock's side).
    pub fn from_stream(
        stream: UnixStream,
        path: &Path,
        op: &'static str,
        budget: Duration,
    ) -> Self {
        Self {
            stream,
            path: path.to_owned(),
            op,
            start: Instant::now(),
            budget,
        }
    }

    /// Starts a new operation with a fresh budget on the same connection.
    pub fn restart_clock(&mut self, op: &'static str, budget: Duration) {
        self.op = op;
        self.start = Instant::now();
        self.budget = budget;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    fn remaining(&self) -> Result<Duration, GpumemdError> {
        let left = self.budget.saturating_sub(self.start.elapsed());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        Ok(left)
    }

    fn timed_out(&self) -> GpumemdError {
        GpumemdError::TimedOut {
            op: self.op,
            after: self.start.elapsed(),
        }
    }

    fn closed(&self) -> GpumemdError {
        GpumemdError::Closed {
            op: self.op,
            path: self.path.clone(),
        }
    }

    fn malformed(&self, source: FrameError) -> GpumemdError {
        GpumemdError::Malformed {
            op: self.op,
            path: self.path.clone(),
            source,
        }
    }

    fn io(&self, source: io::Error) -> GpumemdError {
        GpumemdError::Io {
            op: self.op,
            path: self.path.clone(),
            source: source.into(),
        }
    }

    fn errno(&self, e: Errno) -> GpumemdError {
        match e {
            Errno::EAGAIN | Errno::ETIMEDOUT => self.timed_out(),
            Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN => self.closed(),
            other => self.io(other.into()),
        }
    }

    /// Sends one framed proto.
    pub fn send_proto(&mut self, msg: &UnixSocketProto) -> Result<(), GpumemdError> {
        let frame = encode_frame(msg).map_err(|e| GpumemdError::InvalidArgument(e.to_string()))?;
        self.send_bytes(&frame)
    }

    /// Sends raw bytes (whole), handling short writes.
    pub fn send_bytes(&mut self, mut bytes: &[u8]) -> Result<(), GpumemdError> {
        while !bytes.is_empty() {
            let n = self.sendmsg_once(&[IoSlice::new(bytes)], &[])?;
            bytes = bytes.get(n..).unwrap_or_default();
        }
        Ok(())
    }

    /// Sends the original's fd message: one dummy byte carrying `fds` in an
    /// `SCM_RIGHTS` cmsg (the mock may send other than one fd on purpose).
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> Result<(), GpumemdError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        self.sendmsg_once(&[IoSlice::new(&[0u8])], cmsgs)?;
        Ok(())
    }

    fn sendmsg_once(
        &mut self,
        iov: &[IoSlice<'_>],
        cmsgs: &[ControlMessage],
    ) -> Result<usize, GpumemdError> {
        let left = self.remaining()?;
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| self.io(e))?;
        loop {
            // MSG_NOSIGNAL: a dead daemon must be an error, not SIGPIPE in the host app.
            match sendmsg::<()>(
                self.stream.as_raw_fd(),
                iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(self.errno(e)),
            }
        }
    }

    /// One `recvmsg` into `buf`; returns the byte count and any fds, which
    /// are owned at once so that every error path closes them.
    fn recv_chunk(&mut self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), GpumemdError> {
        let left = self.remaining()?;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| self.io(e))?;
        let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS_PER_MSG]);
        let mut iov = [IoSliceMut::new(buf)];
        let fd = self.stream.as_raw_fd();
        loop {
            let msg = match recvmsg::<()>(
                fd,
                &mut iov,
                Some(&mut cmsg_buf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(self.errno(e)),
            };
            let n = msg.bytes;
            let mut fds = Vec::new();
            // Cannot be truncated (room for SCM_MAX_FD fds), so cmsgs() succeeds.
            let cmsgs = msg.cmsgs().map_err(|e| self.errno(e))?;
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    fds.extend(raw.into_iter().map(adopt_received_fd));
                }
            }
            return Ok((n, fds));
        }
    }

    /// Receives one message: an fd message or a whole proto frame.
    pub fn recv(&mut self) -> Result<Received, GpumemdError> {
        let mut hdr = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let (n, fds) = self.recv_chunk(hdr.get_mut(got..).unwrap_or_default())?;
            if !fds.is_empty() {
                if got == 0 {
                    // Like the original: any SCM_RIGHTS makes it an fd message.
                    return Ok(Received::Fds(fds));
                }
                return Err(self.malformed(FrameError::FdInsideFrame));
            }
            if n == 0 {
                return Err(if got == 0 {
                    self.closed()
                } else {
                    self.malformed(FrameError::TooShort {
                        need: HEADER_LEN,
                        have: got,
                    })
                });
            }
            got += n;
        }
        let len = parse_header(&hdr, MAX_PAYLOAD).map_err(|e| self.malformed(e))?;
        let mut payload = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let (n, fds) = self.recv_chunk(payload.get_mut(got..).unwrap_or_default())?;
            if !fds.is_empty() {
                return Err(self.malformed(FrameError::FdInsideFrame));
            }
            if n == 0 {
                return Err(self.malformed(FrameError::TooShort {
                    need: HEADER_LEN + len,
                    have: HEADER_LEN + got,
                }));
            }
            got += n;
        }
        decode_payload(&payload)
            .map(Received::Proto)
            .map_err(|e| self.malformed(e))
    }

    /// Receives a proto, rejecting fd messages.
    pub fn recv_proto(&mut self) -> Result<UnixSocketProto, GpumemdError> {
        match self.recv()? {
            Received::Proto(p) => Ok(p),
            Received::Fds(fds) => Err(self.malformed(FrameError::UnexpectedKind {
                expected: "proto",
                got: if fds.len() == 1 { "fd" } else { "fds" },
            })),
        }
    }

    /// Receives the reply of `get_gpu_fd_*`: exactly one fd. Reads a single
    /// byte so that a reply without fds is caught at once instead of being
    /// taken for the start of a frame (which would wait out the deadline).
    pub fn recv_one_fd(&mut self) -> Result<OwnedFd, GpumemdError> {
        let mut b = [0u8; 1];
        let (n, mut fds) = self.recv_chunk(&mut b)?;
        if n == 0 && fds.is_empty() {
            return Err(self.closed());
        }
        match (fds.pop(), fds.len()) {
            (Some(fd), 0) => Ok(fd),
            (None, _) => Err(GpumemdError::UnexpectedFdCount {
                op: self.op,
                got: 0,
            }),
            (Some(_), rest) => Err(GpumemdError::UnexpectedFdCount {
                op: self.op,
                got: rest + 1,
            }),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// Takes ownership of a descriptor the kernel installed by `SCM_RIGHTS`.
fn adopt_received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `raw` into this process for this recvmsg
    // only; nothing else knows the number, so this is its only owner.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Socket timeouts of zero mean "forever"; never pass one.
fn nonzero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}
