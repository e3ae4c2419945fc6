//! Per-call trace: with `TCPX_NCCL_TRACE=1`, every data-path entry logs one
//! INFO line (subsystem NET) through NCCL's logger, so `NCCL_DEBUG=INFO
//! NCCL_DEBUG_SUBSYS=NET` shows the plugin's calls between NCCL's own.
//! INFO rather than TRACE: NCCL prints TRACE lines only in its debug builds'
//! sense of `NCCL_DEBUG=TRACE`, which floods the log with NCCL's own.
//! Off, each entry pays one atomic load.

use std::ffi::c_void;
use std::sync::OnceLock;

use devmem::cuda::mem::{pointer_kind, MemKind};

/// The switch, read once.
pub const ENV: &str = "TCPX_NCCL_TRACE";

/// True when `TCPX_NCCL_TRACE=1`.
pub fn on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(ENV).is_ok_and(|v| v == "1"))
}

/// Logs one trace line (only call when [`on`]).
#[macro_export]
macro_rules! ntrace {
    ($($arg:tt)*) => {
        if $crate::trace::on() {
            $crate::nlog!(
                $crate::abi::NCCL_LOG_INFO,
                $crate::abi::NCCL_NET,
                "NET/TCPX-rs : trace {}",
                format_args!($($arg)*)
            )
        }
    };
}

/// What CUDA says `ptr` is: `cuda:<gpu>`, `pinned`, `host`, or why it
/// cannot say. Asks only where a context is current on this thread (NCCL's
/// proxy threads have one), so tracing never creates a context.
pub fn mem_kind(ptr: *const c_void) -> String {
    if !devmem::cuda::available() {
        return "host (no CUDA)".into();
    }
    match devmem::cuda::Context::any_current() {
        Ok(true) => {}
        Ok(false) => return "unknown (no CUDA context on this thread)".into(),
        Err(e) => return format!("unknown ({e})"),
    }
    match pointer_kind(ptr as u64) {
        Ok(MemKind::Device { ordinal }) => format!("cuda:{ordinal}"),
        Ok(MemKind::PinnedHost) => "pinned".into(),
        Ok(MemKind::Unknown) => "host".into(),
        Err(e) => format!("unknown ({e})"),
    }
}
