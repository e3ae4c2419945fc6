//! Errors of the gpumemd client and of the frame parser.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use crate::error::OsError;

/// Why a byte string is not a valid gpumemd frame. Pure parsing errors:
/// the parser returns these for any hostile input and never panics.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FrameError {
    /// Fewer bytes than the frame needs (header or payload cut short).
    #[error("frame too short: need {need} bytes, have {have}")]
    TooShort { need: usize, have: usize },
    /// The length (header, or a payload to encode) is over the limit.
    #[error("frame length {len} is over the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    /// The payload is not a valid `UnixSocketProto`.
    #[error("payload is not a valid UnixSocketProto: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The message decoded but is not the kind this exchange expects.
    #[error("expected a {expected} message, got {got}")]
    UnexpectedKind {
        expected: &'static str,
        got: &'static str,
    },
    /// File descriptors arrived in the middle of a proto frame.
    #[error("file descriptors arrived in the middle of a proto frame")]
    FdInsideFrame,
}

/// Every way a gpumemd exchange can fail. Messages say what to do next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpumemdError {
    /// Nothing listens at the socket path (no file, or connection refused).
    #[error(
        "gpumemd is not listening at {path}: start the receive-datapath daemon \
         (tcpgpudmarxd) or point NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX at its \
         socket directory ({source})"
    )]
    DaemonAbsent {
        path: PathBuf,
        #[source]
        source: OsError,
    },
    /// The daemon answered, but not with success.
    #[error("gpumemd at {path} refused {op}: {reply:?}; check the daemon's log and configuration")]
    Refused {
        op: &'static str,
        path: PathBuf,
        reply: String,
    },
    /// No complete answer before the deadline.
    #[error(
        "gpumemd did not complete {op} within {after:?}; the daemon may be \
         overloaded or wedged (or, for get_gpu_fd, does not know this GPU)"
    )]
    TimedOut { op: &'static str, after: Duration },
    /// The daemon closed the connection before answering.
    #[error("gpumemd at {path} closed the connection during {op}; it may have crashed or restarted, retry once it is back")]
    Closed { op: &'static str, path: PathBuf },
    /// The answer could not be parsed.
    #[error("gpumemd at {path} sent a malformed reply to {op}: {source}; is the daemon the same protocol version?")]
    Malformed {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: FrameError,
    },
    /// The answer parsed, but its contents make no sense.
    #[error("gpumemd at {path} sent an invalid reply to {op}: {detail}")]
    InvalidReply {
        op: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// An fd message carried other than exactly one descriptor.
    #[error("gpumemd sent {got} file descriptors for {op} where exactly one was expected; all were closed")]
    UnexpectedFdCount { op: &'static str, got: usize },
    /// The received descriptor is not a usable RX pool.
    #[error("gpumemd handed an fd that is not a usable RX pool: {detail}; the fd was closed")]
    BadPoolFd { detail: String },
    /// A caller argument cannot be sent (bad PCI address, mixed families, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Any other socket error.
    #[error("I/O error during {op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: OsError,
    },
}
