//! tcpx-rs: the GPUDirect-TCPX transport in Rust.
//!
//! The API has the shape of the TCPX (NCCL net) plugin: [`Net::init`],
//! [`Net::devices`], [`Net::listen`] (a 128-byte [`Handle`] goes to the peer
//! out of band), [`Net::connect`] / [`ListenComm::accept`] (non-blocking),
//! registration, [`SendComm::isend`], grouped [`RecvComm::irecv`] and
//! [`Request::test`]. Messages are striped in chunks over every data socket
//! of every NIC and reassembled in place.
//!
//! ```
//! use std::time::Duration;
//! use tcpx::{Config, HostMemory, Net, RecvBuf};
//!
//! let net = Net::init(Config::loopback(&["127.0.0.1", "127.0.0.2"])?)?;
//! let (handle, mut listener) = net.listen(0)?;
//! let wire = handle.to_bytes(); // travels to the peer out of band
//!
//! let mut h = tcpx::Handle::from_bytes(&wire)?;
//! let (send, recv) = std::thread::scope(|s| {
//!     let t = s.spawn(|| listener.accept_wait(Duration::from_secs(10)));
//!     let send = net.connect_wait(0, &mut h, Duration::from_secs(10));
//!     (send, t.join().unwrap())
//! });
//! let (send, recv) = (send?, recv?);
//!
//! let src = net.reg_mr(HostMemory::from_slice(b"hello, tcpx")?);
//! let mut dst = net.reg_mr(HostMemory::zeroed(64)?);
//! let mut rx = recv.irecv(&[RecvBuf { mr: &dst, offset: 0, len: 64, tag: 7 }])?.expect("slot");
//! let mut tx = send.isend(&src, 0, 11, 7)?.expect("slot");
//! tx.wait(Duration::from_secs(10))?;
//! let sizes = rx.wait(Duration::from_secs(10))?;
//! drop(rx);
//! assert_eq!(&dst.bytes()?[..sizes[0] as usize], b"hello, tcpx");
//! # Ok::<(), tcpx::Error>(())
//! ```

mod accept;
mod bounce;
mod comm;
pub mod config;
mod connect;
mod ctrl;
mod device;
mod engine;
mod error;
pub mod ffi;
mod gpumemd;
mod handle;
mod memory;
mod net;
mod path;
mod region_tx;
mod request;
mod stats;
mod upstream;
pub mod wire;
mod zerocopy;

pub use accept::ListenComm;
pub use bounce::cuda_alloc;
pub use comm::{RecvBuf, RecvComm, Request, SendComm, Waiter};
pub use config::{Config, DevmemMode, EngineKind, LogFilter, NicSpec, RxmemImport, ZeroCopy};
pub use device::{DataPath, Device, PtrKinds};
pub use error::{Error, Result};
pub use handle::{Handle, HANDLE_SIZE};
pub use memory::{HostMemory, MemoryRegion, PtrKind};
pub use net::Net;
pub use request::Sizes;
pub use stats::{NicStats, PathStats, SocketStats, Stats};

/// Entry points for the fuzz targets (`fuzz/`); not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    /// Hostile bytes into both ends of the control protocol.
    pub fn control_stream(data: &[u8]) {
        crate::ctrl::feed_both(data);
    }
}
