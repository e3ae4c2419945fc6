//! The TCPX deployment's environment block, set whole: `Net::init` reports
//! every variable of it once, with what it does here, and the values that
//! matter reach the config.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tcpx::config::RxmemImport;
use tcpx::{Config, LogFilter, Net, NicSpec, ZeroCopy};

/// The block as UCCL's TCPX users set it, on loopback (plus TCPX_GPU_PCI,
/// which this build needs beside a gpumemd prefix; no daemon answers there).
fn block(prefix: &str) -> Vec<(&'static str, String)> {
    [
        ("NCCL_SOCKET_IFNAME", "lo"),
        ("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME", "127.0.0.1"),
        ("NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT", "1"),
        ("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX", prefix),
        (
            "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS",
            "50000",
        ),
        ("NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE", "4096"),
        ("NCCL_GPUDIRECTTCPX_FORCE_ACK", "1"),
        ("NCCL_NET_GDR_LEVEL", "PIX"),
        ("NCCL_P2P_PXN_LEVEL", "0"),
        ("UCCL_TCPX_DEBUG", "1"),
        ("NCCL_DEBUG", "INFO"),
        ("NCCL_DEBUG_SUBSYS", "INIT,ENV"),
        ("TCPX_GPU_PCI", "0000:00:00.0"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

fn config(vars: &[(&'static str, String)]) -> Config {
    let m: HashMap<&str, String> = vars.iter().cloned().collect();
    Config::from_lookup(|k| m.get(k).cloned()).unwrap()
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `Net::init(cfg)` with its log (info and above) captured.
fn init_log(cfg: Config) -> String {
    let out = Captured::default();
    let w = out.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let net = tracing::subscriber::with_default(sub, || Net::init(cfg)).unwrap();
    drop(net);
    let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    log
}

fn line_of<'a>(log: &'a str, var: &str) -> &'a str {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!(" {var}=\"")))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{var} reported {} times in:\n{log}",
        lines.len()
    );
    lines[0]
}

#[test]
fn the_whole_block_is_reported_once_at_init_with_its_effect() {
    let dir = std::env::temp_dir().join(format!("tcpx-env-block-{}", std::process::id()));
    let vars = block(dir.to_str().unwrap());
    let cfg = config(&vars);

    // What is honoured reaches the config.
    assert_eq!(cfg.ctrl_nic, Some(NicSpec::Name("lo".into())));
    assert_eq!(
        cfg.data_nics,
        vec![NicSpec::Addr("127.0.0.1".parse().unwrap())]
    );
    assert_eq!(cfg.gpumemd_prefix.as_deref(), Some(dir.as_path()));
    assert_eq!(cfg.flow_steering_wait, Duration::from_millis(50));
    assert_eq!((cfg.zerocopy, cfg.min_zcopy_size), (ZeroCopy::Auto, 4096));
    assert!(cfg.force_ack);
    assert_eq!(cfg.rxmem_import, RxmemImport::GpuPciClient);

    let log = init_log(cfg);
    for (var, _) in vars.iter().filter(|(k, _)| !k.starts_with("TCPX_")) {
        line_of(&log, var);
    }
    let has = |var: &str, level: &str, text: &str| {
        let l = line_of(&log, var);
        assert!(
            l.contains(level) && l.contains(text),
            "{var}: {l:?} lacks {level} {text:?}"
        );
    };
    has(
        "NCCL_SOCKET_IFNAME",
        "INFO",
        "NIC of the control socket: lo",
    );
    has(
        "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME",
        "INFO",
        "data NICs: 127.0.0.1",
    );
    has(
        "NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT",
        "INFO",
        "the RX pool comes from gpumemd's get_gpu_fd_<pci>",
    );
    has(
        "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX",
        "INFO",
        "probed at init for GPU 0000:00:00.0",
    );
    has(
        "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS",
        "INFO",
        "accept holds each new comm 50ms",
    );
    has(
        "NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE",
        "INFO",
        "at least 4096 bytes",
    );
    has(
        "NCCL_GPUDIRECTTCPX_FORCE_ACK",
        "INFO",
        "on, as in the original: each received chunk sets TCP_QUICKACK",
    );
    has("NCCL_NET_GDR_LEVEL", "INFO", "NCCL-only");
    has("NCCL_P2P_PXN_LEVEL", "INFO", "NCCL-only");
    for var in ["UCCL_TCPX_DEBUG", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS"] {
        has(
            var,
            "INFO",
            "our log filter is \"debug\" (decided by UCCL_TCPX_DEBUG=1",
        );
    }
    // The absent daemon is reported too, and init goes on over the host path.
    assert!(log.contains("gpumemd unavailable"), "{log}");
    assert!(
        log.contains("tcpx device: kernel TCP with host memory"),
        "{log}"
    );
}

#[test]
fn nothing_is_reported_when_the_block_is_not_set() {
    let log = init_log(Config::loopback(&["127.0.0.1"]).unwrap());
    assert!(!log.contains("NCCL_"), "{log}");
}

#[test]
fn own_names_override_the_block_and_the_report_says_so() {
    let mut vars = block("/nonexistent");
    vars.push(("TCPX_NICS", "127.0.0.2".into()));
    vars.push(("TCPX_LOG", "tcpx=trace".into()));
    vars.push(("TCPX_DEVMEM", "off".into()));
    vars.push(("NCCL_GPUDIRECTTCPX_FORCE_ACK", "0".into()));
    vars.retain(|(k, v)| !(*k == "NCCL_GPUDIRECTTCPX_FORCE_ACK" && v == "1"));
    let cfg = config(&vars);
    let note = |var: &str| {
        cfg.env_report
            .iter()
            .find(|n| n.var == var)
            .unwrap_or_else(|| panic!("{var} not reported"))
            .clone()
    };
    assert_eq!(
        note("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME").effect,
        "overridden by TCPX_NICS"
    );
    assert!(note("NCCL_DEBUG")
        .effect
        .starts_with("overridden by TCPX_LOG"));
    assert!(note("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX")
        .effect
        .contains("not consulted (TCPX_DEVMEM=off)"));
    let ack = note("NCCL_GPUDIRECTTCPX_FORCE_ACK");
    assert!(!ack.unhonoured && ack.effect.starts_with("off"), "{ack:?}");
}

#[test]
fn the_originals_zero_copy_name_and_its_zero_are_honoured() {
    let c = config(&[("NCCL_MIN_ZCOPY_SIZE", "0".into())]);
    assert_eq!(c.zerocopy, ZeroCopy::Off);
    let c = config(&[
        ("NCCL_MIN_ZCOPY_SIZE", "0".into()),
        ("TCPX_ZEROCOPY", "on".into()),
    ]);
    assert_eq!((c.zerocopy, c.min_zcopy_size), (ZeroCopy::On, 0));
    let c = config(&[("NCCL_MIN_ZCOPY_SIZE", "8192".into())]);
    assert_eq!((c.zerocopy, c.min_zcopy_size), (ZeroCopy::Auto, 8192));
}

#[test]
fn switches_take_only_zero_or_one() {
    let m: HashMap<&str, &str> = [("NCCL_GPUDIRECTTCPX_FORCE_ACK", "yes")].into();
    let e = Config::from_lookup(|k| m.get(k).map(|v| v.to_string())).unwrap_err();
    assert!(e.to_string().contains("use 0 or 1"), "{e}");
    let c = config(&[("NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT", "0".into())]);
    assert_eq!(c.rxmem_import, RxmemImport::LegacyFile);
}

#[test]
fn the_log_filter_of_the_block() {
    let m: HashMap<&str, String> = block("/x").into_iter().collect();
    let f = LogFilter::from_lookup(&|k| m.get(k).cloned());
    assert_eq!(f.directive, "debug");
}
