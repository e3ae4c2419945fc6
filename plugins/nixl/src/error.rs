//! The crate's one error type and its NIXL status codes.
#![forbid(unsafe_code)]

/// `nixl_status_t` values (nixl_types.h of NIXL 1.5.1); the C API returns these.
pub mod status {
    pub const IN_PROG: i32 = 1;
    pub const SUCCESS: i32 = 0;
    pub const ERR_INVALID_PARAM: i32 = -2;
    pub const ERR_BACKEND: i32 = -3;
    pub const ERR_NOT_FOUND: i32 = -4;
    pub const ERR_NOT_ALLOWED: i32 = -6;
    pub const ERR_UNKNOWN: i32 = -8;
    pub const ERR_NOT_SUPPORTED: i32 = -9;
    pub const ERR_REMOTE_DISCONNECT: i32 = -10;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("transport: {0}")]
    Transport(#[from] tcpx::Error),
    #[error("unknown TCPX backend option {key:?}; known options: {known}")]
    UnknownOption { key: String, known: String },
    #[error("bad value {value:?} for TCPX backend option {key:?}: {why}")]
    BadOption {
        key: String,
        value: String,
        why: String,
    },
    #[error("{0} memory is not supported by the TCPX backend (it moves DRAM, and VRAM where CUDA is usable)")]
    UnsupportedMem(String),
    #[error("VRAM needs CUDA, which is unusable in this process: {0}")]
    NoCuda(String),
    #[error("no connection info for agent {0:?}; load its metadata first (add_remote_agent)")]
    UnknownPeer(String),
    #[error("agent {peer:?} refused the access: {text}")]
    Refused { peer: String, text: String },
    #[error("connection to agent {peer:?} lost: {why}")]
    PeerLost { peer: String, why: String },
    #[error("peer violated the TCPX NIXL protocol: {0}")]
    Protocol(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found; it was never registered/loaded or was already released")]
    NotFound(String),
    #[error("timed out after {after_ms} ms while {what}; is the peer alive and reachable?")]
    Timeout { what: String, after_ms: u64 },
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the caller's buffer could not take the data (out of memory)")]
    SinkFailed,
    #[error("CUDA gather or scatter of packed descriptors failed: {0}; check that the GPU is healthy (nvidia-smi) and that the registered VRAM is still allocated")]
    Cuda(String),
}

impl From<ffiguard::ArgError> for Error {
    fn from(e: ffiguard::ArgError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl Error {
    /// The `nixl_status_t` this error is reported as.
    pub fn status(&self) -> i32 {
        use status::*;
        match self {
            Error::UnknownOption { .. } | Error::BadOption { .. } | Error::InvalidArgument(_) => {
                ERR_INVALID_PARAM
            }
            Error::UnsupportedMem(_) | Error::NoCuda(_) => ERR_NOT_SUPPORTED,
            Error::UnknownPeer(_) | Error::NotFound(_) => ERR_NOT_FOUND,
            Error::Refused { .. } => ERR_NOT_ALLOWED,
            Error::PeerLost { .. } | Error::Timeout { .. } => ERR_REMOTE_DISCONNECT,
            Error::Transport(_)
            | Error::Protocol(_)
            | Error::ShuttingDown
            | Error::SinkFailed
            | Error::Cuda(_) => ERR_BACKEND,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
