//! Device memory for tcpx-rs: the gpumemd client, the devmem socket ABI of
//! both kernel families, the RX pool and unpack.

pub mod cuda;
pub mod emu;
mod error;
pub mod gpumemd;
pub mod netlink;
pub mod pool;
pub mod sockabi;
pub mod unpack;

pub use error::{Cause, Error, OsError};
