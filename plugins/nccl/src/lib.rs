//! NCCL net plugin over the tcpx transport.
//!
//! Built as `libnccl_net_tcpx.so` (build.sh copies it to NCCL's name,
//! `libnccl-net-tcpx.so`). It exports `ncclNetPlugin_v11`, `_v10`, `_v9` and
//! `_v8`; NCCL takes the newest it knows. Every entry maps onto the
//! transport's API (`tcpx::Net`, comms, `Request::test`), moves host memory
//! only (`NCCL_PTR_HOST`: NCCL stages GPU data through host buffers), logs
//! through NCCL's logger, and never unwinds into NCCL.

mod abi;
mod log;
mod plugin;
mod tables;
