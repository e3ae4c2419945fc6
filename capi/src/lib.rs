//! `libtcpx_capi.so` / `libtcpx_capi.a`: the `tcpx_*` functions of
//! `include/tcpx.h`, defined in `tcpx::ffi` and exported from here.
#![forbid(unsafe_code)]

pub use tcpx::ffi::*;
