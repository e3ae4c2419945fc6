//! NCCL net plugin over the tcpx transport.
//!
//! Built as `libnccl_net_tcpx.so` (build.sh copies it to NCCL's name,
//! `libnccl-net-tcpx.so`). It exports `ncclNetPlugin_v11`, `_v10`, `_v9` and
//! `_v8` (and `_v12`); NCCL takes the newest it knows. Every entry maps
//! onto the transport's API (`tcpx::Net`, comms, `Request::test`), moves host
//! memory, and CUDA memory in GDR mode (`TCPX_NCCL_GDR=1`: the transport's
//! bounce path), logs through NCCL's logger (every call with
//! `TCPX_NCCL_TRACE=1`), and never unwinds into NCCL.

mod abi;
mod log;
mod plugin;
mod tables;
mod trace;
