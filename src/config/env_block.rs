//! The TCPX deployment's environment block: what each of its variables does
//! in this build, reported once at init (`Config::log_env`, called by
//! `Net::init`), and the mapping of the NCCL/UCCL debug variables to our
//! log filter.
//!
//! Users of Google's TCPX plugin (and UCCL's TCPX engine on top of it) set
//! the same block on every host. Each variable of it that is set gets one
//! line: honoured (with the value in effect), recorded for later, NCCL-only,
//! or no effect here, and why.

use super::{Config, DevmemMode, RxmemImport, ZeroCopy};

/// One variable of the block as this build understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvNote {
    pub var: &'static str,
    pub value: String,
    /// What it does here.
    pub effect: String,
    /// The value asks for behaviour this build does not have (logged as a warning).
    pub unhonoured: bool,
}

/// Read by NCCL itself, never by a net plugin or a NIXL backend.
const NCCL_ONLY: &[(&str, &str)] = &[
    (
        "NCCL_NET_GDR_LEVEL",
        "how close NIC and GPU must be for NCCL to use GPUDirect",
    ),
    (
        "NCCL_P2P_PXN_LEVEL",
        "whether NCCL routes sends through a GPU near the NIC (PXN)",
    ),
    (
        "NCCL_CROSS_NIC",
        "whether NCCL rings may use different NICs on each end",
    ),
    ("NCCL_ALGO", "NCCL's collective algorithm"),
    ("NCCL_PROTO", "NCCL's collective protocol"),
    ("NCCL_MIN_NCHANNELS", "NCCL's channel count"),
    ("NCCL_MAX_NCHANNELS", "NCCL's channel count"),
    ("NCCL_BUFFSIZE", "NCCL's staging buffer per channel"),
    (
        "NCCL_P2P_NET_CHUNKSIZE",
        "NCCL's chunk for point-to-point over the network",
    ),
];

/// The original's knobs this build has no counterpart for.
const NO_EFFECT: &[(&str, &str)] = &[
    (
        "NCCL_GPUDIRECTTCPX_TX_BINDINGS",
        "the original pins its send threads to these cores; this build does not pin its NIC workers",
    ),
    (
        "NCCL_GPUDIRECTTCPX_RX_BINDINGS",
        "the original pins its receive threads to these cores; this build does not pin its NIC workers",
    ),
    (
        "NCCL_GPUDIRECTTCPX_TX_COMPLETION_NANOSLEEP",
        "the original's send threads sleep this long between completion polls; this build's workers wait in epoll/io_uring",
    ),
    (
        "NCCL_GPUDIRECTTCPX_RX_COMPLETION_NANOSLEEP",
        "not read by the original plugin either",
    ),
    (
        "NCCL_DYNAMIC_CHUNK_SIZE",
        "the original's per-socket task size; this build's chunk is TCPX_CHUNK_SIZE",
    ),
];

/// Every variable reported (the block, plus the rest of UCCL's TCPX block).
pub const REPORTED: &[&str] = &[
    "NCCL_SOCKET_IFNAME",
    "NCCL_GPUDIRECTTCPX_CTRL_DEV",
    "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME",
    "NCCL_NSOCKS_PERTHREAD",
    "NCCL_SOCKET_NTHREADS",
    "NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT",
    "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX",
    "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS",
    "NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE",
    "NCCL_MIN_ZCOPY_SIZE",
    "NCCL_GPUDIRECTTCPX_FORCE_ACK",
    "UCCL_TCPX_DEBUG",
    "NCCL_DEBUG",
    "NCCL_DEBUG_SUBSYS",
];

/// The notes for every reported variable that `get` finds, in table order.
pub(super) fn notes(get: &dyn Fn(&str) -> Option<String>, c: &Config) -> Vec<EnvNote> {
    let names = REPORTED
        .iter()
        .chain(NCCL_ONLY.iter().map(|(n, _)| n))
        .chain(NO_EFFECT.iter().map(|(n, _)| n));
    names
        .filter_map(|&var| {
            let value = get(var)?;
            let (effect, unhonoured) = effect(var, get, c);
            Some(EnvNote {
                var,
                value,
                effect,
                unhonoured,
            })
        })
        .collect()
}

fn effect(var: &'static str, get: &dyn Fn(&str) -> Option<String>, c: &Config) -> (String, bool) {
    // Where our own name (or a stronger alias) is also set, it decides.
    let winner = |order: &[&'static str]| order.iter().copied().find(|k| get(k).is_some());
    let overridden = |order: &[&'static str]| match winner(order) {
        Some(w) if w != var => Some(format!("overridden by {w}")),
        _ => None,
    };
    let honoured =
        |order: &[&'static str], what: String| (overridden(order).unwrap_or(what), false);
    if let Some((_, what)) = NCCL_ONLY.iter().find(|(n, _)| *n == var) {
        return (
            format!("NCCL-only ({what}): read by NCCL itself, never by a net plugin or a NIXL backend; no effect on this transport"),
            false,
        );
    }
    if let Some((_, why)) = NO_EFFECT.iter().find(|(n, _)| *n == var) {
        return (format!("no effect here: {why}"), false);
    }
    match var {
        "NCCL_SOCKET_IFNAME" | "NCCL_GPUDIRECTTCPX_CTRL_DEV" => honoured(
            &["TCPX_CTRL_NIC", "NCCL_GPUDIRECTTCPX_CTRL_DEV", "NCCL_SOCKET_IFNAME"],
            format!("NIC of the control socket: {}", nic(c.ctrl_nic.as_ref())),
        ),
        "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME" => honoured(
            &["TCPX_NICS", "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME"],
            format!(
                "data NICs: {}",
                c.data_nics.iter().map(|n| nic(Some(n))).collect::<Vec<_>>().join(",")
            ),
        ),
        "NCCL_NSOCKS_PERTHREAD" | "NCCL_SOCKET_NTHREADS" => honoured(
            &["TCPX_SOCKETS_PER_NIC", var],
            format!(
                "data sockets per NIC per comm: {} (NSOCKS_PERTHREAD x SOCKET_NTHREADS)",
                c.sockets_per_nic
            ),
        ),
        "NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT" => {
            let style = match c.rxmem_import {
                RxmemImport::GpuPciClient => {
                    "the RX pool comes from gpumemd's get_gpu_fd_<pci> and get_gpu_metadata_<pci> sockets".to_string()
                }
                RxmemImport::LegacyFile => format!(
                    "legacy RX pool import: the CUDA IPC handle in {} (cuIpcOpenMemHandle)",
                    devmem::gpumemd::legacy::legacy_path(&c.rxmem_legacy_dir, "<pci>").display()
                ),
            };
            (style, false)
        }
        "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX" => {
            let what = match (&c.gpumemd_prefix, c.devmem, &c.gpu_pci) {
                (_, DevmemMode::Off, _) => "gpumemd is not consulted (TCPX_DEVMEM=off)".into(),
                (Some(p), mode, Some(pci)) => format!(
                    "gpumemd's socket folder: {}; probed at init for GPU {pci} (TCPX_DEVMEM={})",
                    p.display(),
                    match mode {
                        DevmemMode::Require => "require",
                        _ => "prefer",
                    }
                ),
                (Some(p), _, None) => format!("gpumemd's socket folder: {}", p.display()),
                (None, _, _) => "unused".into(),
            };
            honoured(
                &["TCPX_GPUMEMD_PREFIX", "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX"],
                what,
            )
        }
        "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS" => honoured(
            &["TCPX_FLOW_STEERING_WAIT_US", var],
            format!(
                "accept holds each new comm {:?} before handing it out (the original waits 5 s when unset, this build 0)",
                c.flow_steering_wait
            ),
        ),
        "NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE" | "NCCL_MIN_ZCOPY_SIZE" => {
            let what = match c.zerocopy {
                ZeroCopy::Off => "MSG_ZEROCOPY off (0 turns it off, as in the original)".to_string(),
                mode => format!(
                    "MSG_ZEROCOPY for host-memory chunks of at least {} bytes (TCPX_ZEROCOPY={})",
                    c.min_zcopy_size,
                    if mode == ZeroCopy::On { "on" } else { "auto" }
                ),
            };
            let what = if var == "NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE" {
                format!("{what}; the original plugin reads NCCL_MIN_ZCOPY_SIZE, both are accepted here")
            } else {
                what
            };
            honoured(
                &[
                    "TCPX_MIN_ZCOPY_SIZE",
                    "NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE",
                    "NCCL_MIN_ZCOPY_SIZE",
                ],
                what,
            )
        }
        "NCCL_GPUDIRECTTCPX_FORCE_ACK" if c.force_ack => (
            "on, as in the original: each received chunk sets TCP_QUICKACK on its data socket, \
             so the sender is not held by delayed ACKs"
                .into(),
            false,
        ),
        "NCCL_GPUDIRECTTCPX_FORCE_ACK" => (
            "off, as in the original's default: data sockets acknowledge by the kernel's delayed-ACK rules".into(),
            false,
        ),
        "UCCL_TCPX_DEBUG" | "NCCL_DEBUG" | "NCCL_DEBUG_SUBSYS" => {
            let f = LogFilter::from_lookup(get);
            match winner(&["TCPX_LOG"]) {
                Some(w) => (format!("overridden by {w} ({:?})", f.directive), false),
                None => (
                    format!(
                        "our log filter is {:?} (decided by {}; tcpx-bench and the NIXL plugin apply it, under NCCL its own logger does)",
                        f.directive, f.from
                    ),
                    false,
                ),
            }
        }
        _ => ("not understood".into(), false),
    }
}

fn nic(n: Option<&super::NicSpec>) -> String {
    match n {
        None => "the comm's device".into(),
        Some(super::NicSpec::Name(s)) => s.clone(),
        Some(super::NicSpec::Addr(a)) => a.to_string(),
    }
}

/// The `tracing` filter a front end should install (`tracing_subscriber::EnvFilter` syntax).
///
/// `TCPX_LOG` (a full filter) wins. Otherwise the more verbose of:
/// - `UCCL_TCPX_DEBUG` set and not starting with `0` (UCCL's rule): `debug`;
/// - `NCCL_DEBUG`: `VERSION` -> `error`, `WARN` -> `warn`, `INFO`/`ABORT` -> `info`,
///   `TRACE` -> `trace`; our lines count as NCCL's `INIT`, `ENV` and `NET`
///   subsystems, so an `NCCL_DEBUG_SUBSYS` naming none of them (or `ALL`)
///   leaves only warnings, as NCCL always prints those;
/// - `warn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter {
    pub directive: String,
    /// The variables that decided it, for the report.
    pub from: String,
}

impl LogFilter {
    pub fn from_env() -> Self {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Self {
        if let Some(f) = get("TCPX_LOG").filter(|f| !f.trim().is_empty()) {
            return LogFilter {
                directive: f.trim().to_string(),
                from: "TCPX_LOG".into(),
            };
        }
        // 0 error, 1 warn, 2 info, 3 debug, 4 trace; each variable proposes one.
        const NAMES: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
        let mut proposals: Vec<(usize, String)> = vec![];
        if let Some(v) = get("UCCL_TCPX_DEBUG") {
            if !v.is_empty() && !v.starts_with('0') {
                proposals.push((3, format!("UCCL_TCPX_DEBUG={v}")));
            }
        }
        if let Some(v) = get("NCCL_DEBUG") {
            let nccl = match v.trim().to_ascii_uppercase().as_str() {
                "VERSION" => Some(0),
                "WARN" => Some(1),
                "INFO" | "ABORT" => Some(2),
                "TRACE" => Some(4),
                _ => None,
            };
            if let Some(n) = nccl {
                let mut why = format!("NCCL_DEBUG={v}");
                let subsys = get("NCCL_DEBUG_SUBSYS");
                if let Some(s) = &subsys {
                    why.push_str(&format!(", NCCL_DEBUG_SUBSYS={s}"));
                }
                let ours = subsys.as_deref().is_none_or(selects_ours);
                proposals.push((if ours { n } else { n.min(1) }, why));
            }
        }
        let (level, from) = proposals
            .into_iter()
            .max_by_key(|(l, _)| *l)
            .unwrap_or((1, "default".into()));
        LogFilter {
            directive: NAMES[level].into(),
            from,
        }
    }
}

/// Whether an `NCCL_DEBUG_SUBSYS` list selects our lines (INIT, ENV, NET or
/// ALL; a leading `^` selects everything but the list, as in NCCL).
fn selects_ours(list: &str) -> bool {
    let (invert, list) = match list.trim().strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, list),
    };
    let named = list.split(',').any(|s| {
        matches!(
            s.trim().to_ascii_uppercase().as_str(),
            "INIT" | "ENV" | "NET" | "ALL"
        )
    });
    named != invert
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn filter(pairs: &[(&str, &str)]) -> String {
        let m: HashMap<&str, &str> = pairs.iter().copied().collect();
        LogFilter::from_lookup(&|k| m.get(k).map(|v| v.to_string())).directive
    }

    #[test]
    fn debug_variables_map_to_a_log_filter() {
        for (pairs, want) in [
            (&[][..], "warn"),
            (&[("NCCL_DEBUG", "INFO")][..], "info"),
            (
                &[("NCCL_DEBUG", "info"), ("NCCL_DEBUG_SUBSYS", "ENV")][..],
                "info",
            ),
            (
                &[("NCCL_DEBUG", "INFO"), ("NCCL_DEBUG_SUBSYS", "INIT,NET")][..],
                "info",
            ),
            (
                &[("NCCL_DEBUG", "INFO"), ("NCCL_DEBUG_SUBSYS", "COLL,GRAPH")][..],
                "warn",
            ),
            (
                &[
                    ("NCCL_DEBUG", "INFO"),
                    ("NCCL_DEBUG_SUBSYS", "^NET,INIT,ENV"),
                ][..],
                "warn",
            ),
            (
                &[("NCCL_DEBUG", "INFO"), ("NCCL_DEBUG_SUBSYS", "^COLL")][..],
                "info",
            ),
            (
                &[("NCCL_DEBUG", "TRACE"), ("NCCL_DEBUG_SUBSYS", "ALL")][..],
                "trace",
            ),
            (&[("NCCL_DEBUG", "WARN")][..], "warn"),
            (&[("NCCL_DEBUG", "VERSION")][..], "error"),
            (&[("NCCL_DEBUG", "LOUD")][..], "warn"),
            (&[("UCCL_TCPX_DEBUG", "1")][..], "debug"),
            (&[("UCCL_TCPX_DEBUG", "0")][..], "warn"),
            (&[("UCCL_TCPX_DEBUG", "")][..], "warn"),
            (
                &[("UCCL_TCPX_DEBUG", "1"), ("NCCL_DEBUG", "WARN")][..],
                "debug",
            ),
            (
                &[("UCCL_TCPX_DEBUG", "1"), ("NCCL_DEBUG", "TRACE")][..],
                "trace",
            ),
            (
                &[("TCPX_LOG", "tcpx=debug"), ("NCCL_DEBUG", "TRACE")][..],
                "tcpx=debug",
            ),
        ] {
            assert_eq!(filter(pairs), want, "{pairs:?}");
        }
    }

    #[test]
    fn the_filter_names_the_variables_that_decided_it() {
        let m: HashMap<&str, &str> = [("NCCL_DEBUG", "INFO"), ("NCCL_DEBUG_SUBSYS", "ENV")].into();
        let f = LogFilter::from_lookup(&|k| m.get(k).map(|v| v.to_string()));
        assert_eq!(f.from, "NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=ENV");
        assert_eq!(LogFilter::from_lookup(&|_| None).from, "default");
    }
}
