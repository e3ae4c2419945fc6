//! The one error type of the transport, and its stable C codes.
#![forbid(unsafe_code)]

use std::ffi::c_int;
use std::io;

use crate::ffi::*;
use devmem::Cause;

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
    /// A gpumemd flow-steering request failed (under `TCPX_DEVMEM=require`).
    #[error("gpumemd: {0}")]
    Gpumemd(String),
    /// Device memory: gpumemd, the RX pool, the devmem socket, unpack,
    /// netlink or CUDA; [`devmem::Error::cause`] says which.
    #[error(transparent)]
    Devmem(#[from] devmem::Error),
    #[error("the peer sent nothing for {after_ms} ms (no heartbeat): its process is frozen or its host or network is gone; raise TCPX_PEER_TIMEOUT_MS if it may pause longer")]
    PeerUnresponsive { after_ms: u64 },
    #[error("the peer closed the comm")]
    PeerClosed,
    #[error("every data socket of the comm is gone ({sockets} socket(s); the last: {last}): the data NICs' paths to the peer are down; check their links and routes (`ip link`, `ip route`), then connect a new comm")]
    AllPathsLost { sockets: usize, last: String },
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

    /// A device-memory error of any of devmem's modules.
    pub(crate) fn devmem(e: impl Into<devmem::Error>) -> Self {
        Error::Devmem(e.into())
    }

    /// The stable C code (`TCPX_E*`, include/tcpx.h): the one table.
    pub fn code(&self) -> c_int {
        match self {
            Error::Config(_) => TCPX_ECONFIG,
            Error::NoSuchDevice { .. } => TCPX_ENODEV,
            Error::Interface(_) => TCPX_EINTERFACE,
            Error::BadHandle(_) => TCPX_EBADHANDLE,
            Error::Protocol(_) => TCPX_EPROTOCOL,
            Error::Truncated { .. } => TCPX_ETRUNCATED,
            Error::TagMismatch(_) => TCPX_ETAGMISMATCH,
            Error::ConnectionLost(_) => TCPX_ECONNLOST,
            Error::Closed => TCPX_ECLOSED,
            Error::Busy => TCPX_EBUSY,
            Error::InvalidArgument(_) => TCPX_EINVAL,
            Error::Timeout { .. } => TCPX_ETIMEDOUT,
            Error::Unsupported(_) => TCPX_EUNSUPPORTED,
            Error::Io { .. } => TCPX_EIO,
            Error::Gpumemd(_) => TCPX_EGPUMEMD,
            Error::PeerUnresponsive { .. } => TCPX_EPEER,
            Error::PeerClosed => TCPX_EPEERCLOSED,
            Error::AllPathsLost { .. } => TCPX_EPATHS,
            Error::Devmem(e) => match e.cause() {
                Cause::GpumemdAbsent
                | Cause::GpumemdRefused
                | Cause::GpumemdUnresponsive
                | Cause::GpumemdMalformed
                | Cause::GpumemdIo => TCPX_EGPUMEMD,
                _ => TCPX_EDEVMEM,
            },
        }
    }

    /// The `TCPX_CAUSE_*` of a device-memory error; `TCPX_CAUSE_NONE` otherwise.
    pub fn cause_code(&self) -> c_int {
        let Error::Devmem(e) = self else {
            return TCPX_CAUSE_NONE;
        };
        match e.cause() {
            Cause::GpumemdAbsent => TCPX_CAUSE_GPUMEMD_ABSENT,
            Cause::GpumemdRefused => TCPX_CAUSE_GPUMEMD_REFUSED,
            Cause::GpumemdUnresponsive => TCPX_CAUSE_GPUMEMD_UNRESPONSIVE,
            Cause::GpumemdMalformed => TCPX_CAUSE_GPUMEMD_MALFORMED,
            Cause::GpumemdIo => TCPX_CAUSE_GPUMEMD_IO,
            Cause::PoolFdBad => TCPX_CAUSE_POOL_FD_BAD,
            Cause::PoolFull => TCPX_CAUSE_POOL_FULL,
            Cause::CmsgMalformed => TCPX_CAUSE_CMSG_MALFORMED,
            Cause::Unpack => TCPX_CAUSE_UNPACK,
            Cause::Kernel => TCPX_CAUSE_KERNEL,
            Cause::NicUnsupported => TCPX_CAUSE_NIC_UNSUPPORTED,
            Cause::PermissionDenied => TCPX_CAUSE_PERMISSION,
            Cause::CudaUnavailable => TCPX_CAUSE_CUDA_UNAVAILABLE,
            Cause::CudaFailed => TCPX_CAUSE_CUDA_FAILED,
            Cause::InvalidArgument => TCPX_CAUSE_INVALID_ARGUMENT,
            _ => TCPX_CAUSE_OTHER,
        }
    }
}

impl From<ffiguard::ArgError> for Error {
    fn from(e: ffiguard::ArgError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
