//! The plugin's logger: the transport's and the engine's `tracing` events go
//! to stderr, filtered as `tcpx::LogFilter` says (`TCPX_LOG`, else the more
//! verbose of `UCCL_TCPX_DEBUG` and `NCCL_DEBUG`/`NCCL_DEBUG_SUBSYS`, else
//! warnings only). This .so carries its own copy of `tracing`, so the global
//! default set here is ours alone and does not touch the host's Rust code.

use std::io::IsTerminal;
use std::sync::Once;

use tracing_subscriber::EnvFilter;

/// Installs the logger once per process, before the first engine starts.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let f = tcpx::LogFilter::from_env();
        let filter = EnvFilter::try_new(&f.directive).unwrap_or_else(|e| {
            eprintln!(
                "nixl TCPX: log filter {:?} (from {}) is not valid ({e}); logging warnings only",
                f.directive, f.from
            );
            EnvFilter::new("warn")
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init();
    });
}
