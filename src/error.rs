//! The one error type of the transport, and its stable C codes.

use std::io;

/// Everything that can go wrong in the transport. Variants say what to do.
///
/// `Clone` because one broken socket fails every request that used it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "no device {dev}: {count} device(s) are configured (see NCCL_GPUDIRECTTCPX_SOCKET_IFNAME)"
    )]
    NoSuchDevice { dev: usize, count: usize },
    #[error("interface {0:?} not found or has no usable IP address; check `ip addr` and NCCL_GPUDIRECTTCPX_SOCKET_IFNAME")]
    Interface(String),
    #[error("bad listen handle: {0}; pass the 128 bytes from listen() unchanged")]
    BadHandle(String),
    #[error("peer violated the wire protocol: {0}")]
    Protocol(String),
    #[error("message of {message} bytes (tag {tag}) does not fit the {buffer}-byte receive buffer; post a larger buffer")]
    Truncated { tag: i32, message: u64, buffer: u64 },
    #[error("message with tag {0} matches no buffer of the posted receive")]
    TagMismatch(i32),
    #[error("connection to the peer lost: {0}")]
    ConnectionLost(String),
    #[error("the comm was closed while the request was in flight")]
    Closed,
    #[error("memory region busy: requests using it are still in flight; test() them to completion first")]
    Busy,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("timed out after {after_ms} ms while {what}")]
    Timeout { what: String, after_ms: u64 },
    #[error("not supported here: {0}")]
    Unsupported(String),
    #[error("gpumemd: {0}")]
    Gpumemd(String),
    #[error("the peer sent nothing for {after_ms} ms (no heartbeat): its process is frozen or its host or network is gone; raise TCPX_PEER_TIMEOUT_MS if it may pause longer")]
    PeerUnresponsive { after_ms: u64 },
    #[error("the peer closed the comm")]
    PeerClosed,
    #[error("{op} failed: {msg} ({kind:?})")]
    Io {
        op: &'static str,
        kind: io::ErrorKind,
        msg: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => Error::ConnectionLost(format!("{op}: {e}")),
            kind => Error::Io {
                op,
                kind,
                msg: e.to_string(),
            },
        }
    }

    /// Stable integer code for the C ABI (`TCPX_E*` in include/tcpx.h).
    pub fn code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::NoSuchDevice { .. } => 3,
            Error::Interface(_) => 4,
            Error::BadHandle(_) => 5,
            Error::Protocol(_) => 6,
            Error::Truncated { .. } => 7,
            Error::TagMismatch(_) => 8,
            Error::ConnectionLost(_) => 9,
            Error::Closed => 10,
            Error::Busy => 11,
            Error::InvalidArgument(_) => 12,
            Error::Timeout { .. } => 13,
            Error::Unsupported(_) => 14,
            Error::Io { .. } => 15,
            Error::Gpumemd(_) => 16,
            Error::PeerUnresponsive { .. } => 17,
            Error::PeerClosed => 18,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
