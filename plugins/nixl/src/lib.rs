//! NIXL backend plugin `TCPX`: one-sided WRITE/READ between NIXL agents over
//! the tcpx transport.
//!
//! - [`Engine`] (Rust) is the whole backend: registrations checked on every
//!   incoming access, links to peers, transfers, notifications; the wire
//!   protocol is in `PROTOCOL.md` and [`proto`].
//! - [`ffi`] exports it as a small C API; `shim/plugin.cpp` wraps that in
//!   NIXL's `nixlBackendEngine` C++ class, compiled by `build.rs`.
//! - The cdylib is `libplugin_TCPX.so`: put its folder in `NIXL_PLUGIN_DIR`.
//!
//! ```no_run
//! use plugin_TCPX::*;
//! let a = Engine::new("A", Options::parse([("nics", "127.0.0.1")])?)?;
//! let b = Engine::new("B", Options::parse([("nics", "127.0.0.1")])?)?;
//! a.load_conn_info("B", &b.conn_info())?;
//! let mut src = vec![7u8; 4096];
//! let mut dst = vec![0u8; 4096];
//! // SAFETY: both buffers outlive the engines' use of them.
//! let (ls, rd) = unsafe {
//!     (a.register(src.as_mut_ptr() as u64, 4096, Mem::Dram)?, b.register(dst.as_mut_ptr() as u64, 4096, Mem::Dram)?)
//! };
//! let rmd = a.load_remote_md("B", &b.public_data(rd)?, Mem::Dram)?;
//! let d = XferDesc { local_addr: src.as_ptr() as u64, remote_addr: dst.as_ptr() as u64, len: 4096, local_md: ls, remote_md: rmd };
//! let x = a.post(Op::Write, "B", &[d], Some(b"done"))?;
//! while !x.check()? { std::thread::yield_now(); }
//! # Ok::<(), Error>(())
//! ```
// NIXL finds plugins by file name, so the library is `plugin_TCPX`.
#![allow(non_snake_case)]

mod engine;
mod error;
pub mod ffi;
mod handshake;
mod inbox;
mod log;
mod options;
mod outbox;
mod pack;
pub mod proto;
mod registry;
mod state;

pub use engine::{Engine, Op, Prepared, XferDesc};
pub use error::{status, Error, Result};
pub use options::{Options, Progress, OPTIONS};
pub use registry::Mem;
pub use state::XferState;
