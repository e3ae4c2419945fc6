//! Logging through NCCL's logger: our own lines, and the transport's
//! `tracing` events, so that NCCL_DEBUG/NCCL_DEBUG_SUBSYS govern both.

use std::ffi::{c_int, c_ulong, CString};
use std::fmt::Write as _;
use std::sync::{Mutex, Once};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::abi::{ncclDebugLogger_t, NCCL_LOG_INFO, NCCL_LOG_TRACE, NCCL_LOG_WARN, NCCL_NET};

/// The logger of the latest init (NCCL passes the same one every time).
static LOGGER: Mutex<ncclDebugLogger_t> = Mutex::new(None);

pub fn set_logger(f: ncclDebugLogger_t) {
    *LOGGER.lock().unwrap_or_else(|p| p.into_inner()) = f;
    install_tracing_bridge();
}

/// Logs `msg` at `level` for `flags`; silently dropped before init gave a logger.
pub fn log(level: c_int, flags: c_ulong, file: &str, line: u32, msg: &str) {
    let Some(f) = *LOGGER.lock().unwrap_or_else(|p| p.into_inner()) else {
        return;
    };
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    let file = CString::new(file.replace('\0', " ")).unwrap_or_default();
    let line = c_int::try_from(line).unwrap_or(0);
    // SAFETY: NCCL's logger is a printf-style C function that lives as long
    // as libnccl; "%s" consumes exactly the one NUL-terminated string we pass.
    unsafe {
        f(
            level,
            flags,
            file.as_ptr(),
            line,
            c"%s".as_ptr(),
            msg.as_ptr(),
        )
    };
}

#[macro_export]
macro_rules! nlog {
    ($level:expr, $flags:expr, $($arg:tt)*) => {
        $crate::log::log($level, $flags, file!(), line!(), &format!($($arg)*))
    };
}

pub fn warn(msg: &str) {
    log(NCCL_LOG_WARN, NCCL_NET, file!(), line!(), msg);
}

/// Forwards `tracing` events (INFO and above) to NCCL's logger.
struct NcclLayer;

#[derive(Default)]
struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

impl<S: Subscriber> Layer<S> for NcclLayer {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        *meta.level() <= Level::INFO
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR | Level::WARN => NCCL_LOG_WARN,
            Level::INFO => NCCL_LOG_INFO,
            _ => NCCL_LOG_TRACE,
        };
        let mut f = Fields::default();
        event.record(&mut f);
        log(
            level,
            NCCL_NET,
            meta.file().unwrap_or("tcpx"),
            meta.line().unwrap_or(0),
            &format!("NET/TCPX-rs : {}", f.0),
        );
    }
}

/// Once per process. This .so carries its own copy of `tracing`, so the
/// global default here is ours alone and does not touch the host's Rust code.
fn install_tracing_bridge() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let sub = tracing_subscriber::registry().with(NcclLayer);
        if tracing::subscriber::set_global_default(sub).is_err() {
            warn("NET/TCPX-rs : a tracing subscriber was already set; transport logs will not reach NCCL_DEBUG");
        }
    });
}
