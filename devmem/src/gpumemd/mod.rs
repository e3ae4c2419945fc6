//! The gpumemd (receive-datapath daemon) UNIX-socket protocol and client.
//!
//! Byte-compatible with Google's `tcpgpudmarxd` and the TCPX plugin's
//! `rx_buf_mgr_client`; `docs/GPUMEMD.md` lists every message with golden
//! bytes and the source each fact came from.
//!
//! - [`proto`]: the proto2 messages; [`frame`]: the length framing and the
//!   pool metadata struct (sans-I/O, fuzzed);
//! - [`client::GpumemdClient`]: the calls, each bounded by a deadline;
//! - [`mock::MockGpumemd`]: a daemon for tests, with fault injection;
//! - [`legacy`]: the plugin's other import style, a CUDA IPC handle in a file.
//!
//! ```no_run
//! use std::time::Duration;
//! use devmem::gpumemd::{FlowRule, GpumemdClient};
//!
//! let client = GpumemdClient::from_env(Duration::from_secs(2));
//! let _queues = client.queue_ids("0000:04:00.0")?; // probe: is the daemon there?
//! let _reg = client.register()?; // keep alive while the daemon is in use
//! let pool = client.rx_pool("0000:04:00.0")?;
//! let rule = FlowRule::for_accepted("10.0.0.1:5000".parse()?, "10.0.0.2:40000".parse()?)
//!     .with_gpu("0000:04:00.0");
//! let steered = client.steer(rule)?; // removed when dropped
//! # drop((pool, steered));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod conn;
pub mod error;
pub mod frame;
pub mod gpu_pool;
pub mod legacy;
pub mod mock;
pub mod proto;

pub use client::{
    check_pool_fd, FlowRule, GpumemdClient, Registration, RxPool, SteeredFlow, DEFAULT_DEADLINE,
    DEFAULT_PREFIX, OK_REPLY, PREFIX_ENV,
};
pub use error::{FrameError, GpumemdError};
pub use frame::{encode_frame, parse_frame, parse_frame_with_limit, PoolMetadata};
pub use proto::{Payload, UnixSocketProto};

/// Install a flow-steering rule (tcpgpudmarxd `src/rx_rule_manager.cc`).
pub const RULE_INSTALL_SOCKET: &str = "rx_rule_manager";
/// Remove a flow-steering rule.
pub const RULE_UNINSTALL_SOCKET: &str = "rx_rule_uninstall";
/// Queue-id query (`AddGpuQueueIdsServer`).
pub const QUEUE_IDS_SOCKET: &str = "queue_ids_by_gpu";
/// Application registration (`src/application_registry_manager.cc`).
pub const APP_REGISTRY_SOCKET: &str = "rxdm_application_registry";

/// `get_gpu_fd_<pci>` (tcpgpudmarxd `cuda/cu_ipc_memfd_exporter.cu`).
pub fn fd_socket_name(gpu_pci_addr: &str) -> String {
    format!("get_gpu_fd_{gpu_pci_addr}")
}

/// `get_gpu_metadata_<pci>`.
pub fn metadata_socket_name(gpu_pci_addr: &str) -> String {
    format!("get_gpu_metadata_{gpu_pci_addr}")
}
