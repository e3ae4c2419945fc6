//! The crate's one error type: each module's own enum is a variant's
//! source, and [`Error::cause`] sorts them into the few classes a caller
//! acts on differently.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;

use crate::cuda::CudaError;
use crate::gpumemd::{FrameError, GpumemdError};
use crate::netlink::NetlinkError;
use crate::pool::PoolError;
use crate::sockabi::AbiError;
use crate::unpack::UnpackError;

/// Every device-memory failure. `Clone + Eq` so the transport can fail
/// every request of a broken socket with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Gpumemd(#[from] GpumemdError),
    #[error("gpumemd frame: {0}")]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Abi(#[from] AbiError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// What a caller does about an [`Error`]: one class per remedy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// Nothing listens at gpumemd's socket: start the daemon or fix the prefix.
    GpumemdAbsent,
    /// gpumemd answered with a refusal: see its log and configuration.
    GpumemdRefused,
    /// gpumemd timed out or hung up: it is wedged, crashed or restarting.
    GpumemdUnresponsive,
    /// gpumemd's answer does not parse or make sense: another protocol version.
    GpumemdMalformed,
    /// A socket error while talking to gpumemd.
    GpumemdIo,
    /// The RX pool's fd, size or mapping is unusable.
    PoolFdBad,
    /// The RX pool has no free pages: tokens are not coming back.
    PoolFull,
    /// The kernel's devmem control data (cmsgs) is malformed or out of step
    /// with the stream: another kernel ABI, or a desynchronised socket.
    CmsgMalformed,
    /// A fragment list does not fit its buffers.
    Unpack,
    /// The kernel refused or failed a devmem call (token return, netlink).
    Kernel,
    /// The NIC or kernel cannot bind device memory.
    NicUnsupported,
    /// The operation needs CAP_NET_ADMIN.
    PermissionDenied,
    /// CUDA (driver, device or NVRTC) is missing here.
    CudaUnavailable,
    /// A CUDA call failed or timed out.
    CudaFailed,
    /// An argument the caller passed is unusable.
    InvalidArgument,
}

impl Error {
    /// The class of this error; stable for a given variant.
    pub fn cause(&self) -> Cause {
        match self {
            Error::Gpumemd(e) => gpumemd_cause(e),
            Error::Frame(_) => Cause::GpumemdMalformed,
            Error::Pool(e) => pool_cause(e),
            Error::Abi(e) => abi_cause(e),
            Error::Unpack(_) => Cause::Unpack,
            Error::Netlink(e) => netlink_cause(e),
            Error::Cuda(e) => cuda_cause(e),
        }
    }
}

fn gpumemd_cause(e: &GpumemdError) -> Cause {
    match e {
        GpumemdError::DaemonAbsent { .. } => Cause::GpumemdAbsent,
        GpumemdError::Refused { .. } => Cause::GpumemdRefused,
        GpumemdError::TimedOut { .. } | GpumemdError::Closed { .. } => Cause::GpumemdUnresponsive,
        GpumemdError::Malformed { .. }
        | GpumemdError::InvalidReply { .. }
        | GpumemdError::UnexpectedFdCount { .. } => Cause::GpumemdMalformed,
        GpumemdError::BadPoolFd { .. } => Cause::PoolFdBad,
        GpumemdError::InvalidArgument(_) => Cause::InvalidArgument,
        GpumemdError::Io { .. } => Cause::GpumemdIo,
    }
}

fn pool_cause(e: &PoolError) -> Cause {
    match e {
        PoolError::Full { .. } => Cause::PoolFull,
        PoolError::BadSize { .. }
        | PoolError::TooLarge { .. }
        | PoolError::Map { .. }
        | PoolError::LegacyHandle { .. } => Cause::PoolFdBad,
        PoolError::Device(c) => cuda_cause(c),
        _ => Cause::InvalidArgument,
    }
}

fn abi_cause(e: &AbiError) -> Cause {
    match e {
        AbiError::DontNeed { .. } => Cause::Kernel,
        AbiError::NoDevmemAbi { .. } => Cause::NicUnsupported,
        AbiError::NotRepresentable { .. } | AbiError::BadTokenBytes { .. } => {
            Cause::InvalidArgument
        }
        _ => Cause::CmsgMalformed,
    }
}

fn netlink_cause(e: &NetlinkError) -> Cause {
    match e {
        NetlinkError::NoFamily
        | NetlinkError::NotSupported { .. }
        | NetlinkError::BadDmabuf { .. } => Cause::NicUnsupported,
        NetlinkError::PermissionDenied { .. } => Cause::PermissionDenied,
        NetlinkError::NoSuchInterface(_) => Cause::InvalidArgument,
        _ => Cause::Kernel,
    }
}

fn cuda_cause(e: &CudaError) -> Cause {
    match e {
        CudaError::NoDriver(_) | CudaError::NoDevice(_) | CudaError::Nvrtc(_) => {
            Cause::CudaUnavailable
        }
        CudaError::InvalidArgument(_) => Cause::InvalidArgument,
        _ => Cause::CudaFailed,
    }
}

/// An OS error kept by value (kind, errno and text), so that the errors
/// holding one stay `Clone + Eq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsError {
    kind: io::ErrorKind,
    errno: Option<i32>,
    text: String,
}

impl OsError {
    pub fn kind(&self) -> io::ErrorKind {
        self.kind
    }

    /// The errno, when the error came from the OS.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.errno
    }
}

impl From<io::Error> for OsError {
    fn from(e: io::Error) -> Self {
        OsError {
            kind: e.kind(),
            errno: e.raw_os_error(),
            text: e.to_string(),
        }
    }
}

impl fmt::Display for OsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for OsError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn os(errno: i32) -> OsError {
        io::Error::from_raw_os_error(errno).into()
    }

    #[test]
    fn daemon_absent_pool_fd_bad_and_cmsg_malformed_are_told_apart() {
        let absent = Error::from(GpumemdError::DaemonAbsent {
            path: PathBuf::from("/run/x"),
            source: os(libc::ENOENT),
        });
        let bad_fd = Error::from(GpumemdError::BadPoolFd {
            detail: "a pipe".into(),
        });
        let cmsg = Error::from(AbiError::Malformed {
            offset: 3,
            reason: "cut short",
        });
        assert_eq!(absent.cause(), Cause::GpumemdAbsent);
        assert_eq!(bad_fd.cause(), Cause::PoolFdBad);
        assert_eq!(cmsg.cause(), Cause::CmsgMalformed);
        assert!(absent.to_string().contains("/run/x"), "{absent}");
    }

    #[test]
    fn errors_compare_and_clone_by_value() {
        let a = Error::from(PoolError::Map {
            size: 4096,
            source: os(libc::ENOMEM),
        });
        assert_eq!(a.clone(), a);
        assert_eq!(a.cause(), Cause::PoolFdBad);
        let e = os(libc::EBADF);
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        assert_eq!(
            e.to_string(),
            io::Error::from_raw_os_error(libc::EBADF).to_string()
        );
    }

    #[test]
    fn a_gpu_pool_failure_has_its_cuda_cause() {
        let e = Error::from(PoolError::Device(CudaError::NoDriver("none".into())));
        assert_eq!(e.cause(), Cause::CudaUnavailable);
    }
}
