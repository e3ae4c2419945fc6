//! The backend's options: what `create_backend("TCPX", {...})` and NIXL's
//! agent configuration set.
#![forbid(unsafe_code)]

use std::time::Duration;

use tcpx::{Config, NicSpec};

use crate::error::{Error, Result};

/// Backend options (`create_backend("TCPX", {...})`) with their defaults.
pub const OPTIONS: &[(&str, &str)] = &[
    ("nics", ""),
    ("sockets_per_nic", ""),
    ("chunk_size", ""),
    ("timeout_ms", "10000"),
    ("pack_dram", "0"),
];

/// How the engine serves what peers send while no caller polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A thread per peer sleeps on its sockets and wakes when a message
    /// arrives (no CPU while idle; one wake-up per message).
    #[default]
    OnEvents,
    /// One progress thread polls every peer, pausing `delay` between rounds
    /// (zero: it only yields the CPU). NIXL's agent asks for this with its
    /// progress thread on (`enable_prog_thread`, `pthrDelay`), as UCX then
    /// does: lower latency, at the price of a busy core.
    Polling { delay: Duration },
}

/// Parsed backend options.
#[derive(Debug, Clone)]
pub struct Options {
    pub cfg: Config,
    /// Deadline for connecting to a peer, and how long a silent link may stall.
    pub timeout: Duration,
    /// Set by the host (NIXL's agent configuration), not by backend options.
    pub progress: Progress,
    /// Pack small descriptors between DRAM and DRAM too (off: measured
    /// slower on loopback than sending them inline, see `pack::plan`).
    pub pack_dram: bool,
}

impl Options {
    /// Parses options; unknown keys are refused so that typos do not pass silently.
    /// Unset transport settings come from the environment (`Config::from_env`).
    pub fn parse<'a>(kv: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self> {
        let mut cfg = Config::from_env()?;
        let mut timeout = Duration::from_millis(10_000);
        let mut pack_dram = false;
        for (k, v) in kv {
            let bad = |why: String| Error::BadOption {
                key: k.into(),
                value: v.into(),
                why,
            };
            let num = || v.trim().parse::<u64>().map_err(|e| bad(e.to_string()));
            match k {
                _ if v.is_empty() && OPTIONS.iter().any(|(o, _)| *o == k) => {}
                "nics" => {
                    cfg.data_nics = NicSpec::parse_list(v).map_err(|e| bad(e.to_string()))?;
                    cfg.note_override(
                        &["NCCL_GPUDIRECTTCPX_SOCKET_IFNAME"],
                        "the backend option nics",
                    );
                }
                "sockets_per_nic" => {
                    cfg.sockets_per_nic = num()? as usize;
                    cfg.note_override(
                        &["NCCL_NSOCKS_PERTHREAD", "NCCL_SOCKET_NTHREADS"],
                        "the backend option sockets_per_nic",
                    );
                }
                "chunk_size" => {
                    cfg.chunk_size = tcpx::config::parse_size(v).map_err(|e| bad(e.to_string()))?
                }
                "timeout_ms" => timeout = Duration::from_millis(num()?.max(1)),
                "pack_dram" => {
                    pack_dram = match v.trim() {
                        "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        _ => return Err(bad("use 0 or 1".into())),
                    }
                }
                _ => {
                    return Err(Error::UnknownOption {
                        key: k.into(),
                        known: OPTIONS
                            .iter()
                            .map(|(o, _)| *o)
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
        cfg.validate()?;
        Ok(Options {
            cfg,
            timeout,
            progress: Progress::default(),
            pack_dram,
        })
    }
}
