//! The transport's devmem receive path against this machine's kernel.
//!
//! No devmem NIC here, so what is asserted is the kernel's real answers and
//! the transport's handling of them:
//! - with gpumemd (the mock, a memory-file pool), every data socket
//!   receives with `recvmsg(MSG_SOCK_DEVMEM)` on the kernel (the seam's
//!   `KernelSocket`), whose answer on an unsteered loopback flow is linear
//!   bytes without cmsgs: parsed by the same code as fragments, byte-exact,
//!   no token lent or returned;
//! - upstream binding (`TCPX_DEVMEM_QUEUES`) on `lo` and on a veth in a
//!   namespace this test makes: the kernel refuses `bind-rx` before any
//!   device memory exists, and the transport reports it as designed: the
//!   host path with one log line under `prefer`, a typed error naming the
//!   NIC under `require`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{exchange, pair, three_nics};
use devmem::gpumemd::mock::{MockConfig, MockGpumemd};
use devmem::Cause;
use tcpx::{Config, DataPath, DevmemMode, Net, NicSpec};

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

/// `Net::init(cfg)` with the log of this thread (info and above) captured.
fn init_logged(cfg: Config) -> (tcpx::Result<Net>, String) {
    let out = Captured::default();
    let w = out.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let net = tracing::subscriber::with_default(sub, || Net::init(cfg));
    let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    (net, log)
}

fn with_mock(mock: &MockGpumemd, mode: DevmemMode) -> Config {
    let mut c = three_nics();
    c.gpumemd_prefix = Some(mock.prefix().to_path_buf());
    c.gpu_pci = Some(MockConfig::default().gpu_pci);
    c.devmem = mode;
    c
}

fn sizes(seed: u64) -> Vec<usize> {
    common::odd_sizes(seed, 25, 32 << 20)
}

#[test]
fn gpumemd_flows_are_received_through_the_kernels_devmem_socket() {
    let mocks: Vec<MockGpumemd> = (0..2)
        .map(|_| MockGpumemd::start_temp(MockConfig::default()).unwrap())
        .collect();
    let mut nets = Vec::new();
    for m in &mocks {
        let (net, log) = init_logged(with_mock(m, DevmemMode::Require));
        let net = net.unwrap();
        assert!(net.devices().iter().all(|d| d.path == DataPath::Devmem));
        // One line per NIC says where its payload goes, and the ABI probe's
        // finding: this kernel speaks upstream devmem, not TCPX.
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("tcpx device:")).collect();
        assert_eq!(lines.len(), 3, "{log}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains("devmem receive (upstream ABI) into gpumemd's")),
            "{log}"
        );
        assert_eq!(
            log.matches("this kernel speaks the upstream devmem ABI")
                .count(),
            1,
            "{log}"
        );
        nets.push(net);
    }
    let (a, b) = (&nets[0], &nets[1]);
    let mut moved = [0u64; 2];
    std::thread::scope(|s| {
        let mut runs = Vec::new();
        for (k, (x, y, mock, seed)) in [(a, b, &mocks[1], 3u64), (b, a, &mocks[0], 4)]
            .into_iter()
            .enumerate()
        {
            runs.push(s.spawn(move || {
                let (send, recv) = pair(x, y);
                assert_eq!(mock.installed_rules().len(), recv.data_sockets());
                let mut n = 0;
                for (i, len) in sizes(seed).into_iter().enumerate() {
                    exchange(x, y, &send, &recv, len, seed * 1000 + i as u64);
                    // Messages up to the inline threshold go on the control socket.
                    if len > x.config().inline_threshold {
                        n += len as u64;
                    }
                }
                drop(recv);
                assert!(
                    mock.installed_rules().is_empty(),
                    "rules withdrawn on close"
                );
                (k, n)
            }));
        }
        for r in runs {
            let (k, n) = r.join().unwrap();
            moved[k] = n;
        }
    });
    // b received what a sent and a what b sent on data sockets: all of it
    // linear (the kernel's answer on a flow no devmem queue holds), chunk
    // headers too, and no token involved.
    for (net, received) in [(b, moved[0]), (a, moved[1])] {
        let st = net.stats();
        assert!(st.devmem_linear_bytes >= received, "{received}: {st:?}");
        assert_eq!(st.devmem_fragments, 0, "{st:?}");
        assert_eq!(st.devmem_tokens_received, 0, "{st:?}");
        assert_eq!(st.devmem_dontneed_calls, 0, "{st:?}");
        assert_eq!(st.devmem_token_double_returns, 0, "{st:?}");
    }
}

fn upstream_on(nic: &str, mode: DevmemMode) -> Config {
    Config {
        data_nics: vec![NicSpec::parse(nic).unwrap()],
        devmem_queues: vec![0],
        devmem: mode,
        ..Config::default()
    }
}

/// What `Net::init` does with `TCPX_DEVMEM_QUEUES` on `nic` in both modes,
/// returning the kernel's refusal as the transport reported it.
fn bind_refused(nic: &str) -> String {
    let (net, log) = init_logged(upstream_on(nic, DevmemMode::Prefer));
    let net = net.unwrap();
    assert_eq!(net.devices()[0].path, DataPath::Host);
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("devmem receive unavailable"))
        .collect();
    assert_eq!(warned.len(), 1, "one line for the fallback: {log}");
    assert!(warned[0].contains(nic), "{}", warned[0]);
    let line = log
        .lines()
        .find(|l| l.contains("tcpx device:"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("kernel TCP with host memory"), "{line}");
    // The TX probe's answer (bind-tx without device memory) is on the same line.
    assert!(
        line.contains(&format!(
            "bounce staging (no devmem TX: NIC {nic} does not support devmem TX"
        )),
        "{line}"
    );
    // The host path it fell back to carries messages.
    let (send, recv) = pair(&net, &net);
    exchange(&net, &net, &send, &recv, 1 << 20, 9);
    drop((send, recv, net));
    let err = match Net::init(upstream_on(nic, DevmemMode::Require)) {
        Err(e) => e,
        Ok(_) => panic!("{nic} bound a DMA-BUF"),
    };
    let tcpx::Error::Devmem(d) = &err else {
        panic!("untyped: {err:?}")
    };
    assert_eq!(d.cause(), Cause::NicUnsupported, "{err}");
    assert_eq!(err.cause_code(), tcpx::ffi::TCPX_CAUSE_NIC_UNSUPPORTED);
    let msg = err.to_string();
    assert!(msg.contains(nic), "{msg}");
    msg
}

#[test]
fn binding_lo_falls_back_with_one_line_or_fails_naming_it() {
    let msg = bind_refused("lo");
    eprintln!("bind-rx on lo, as the transport reports it: {msg}");
    // This kernel's answer: lo has no queue API.
    assert!(msg.contains("EOPNOTSUPP"), "{msg}");
}

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn create(tag: &str) -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: needs root to create a network namespace");
            return None;
        }
        let name = format!("tcpxdm-{}-{tag}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(o) if o.status.success() => Some(Netns { name }),
            Ok(o) => {
                eprintln!("SKIP: ip netns add: {}", String::from_utf8_lossy(&o.stderr));
                None
            }
            Err(e) => {
                eprintln!("SKIP: `ip` not runnable: {e}");
                None
            }
        }
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a thread inside the namespace (threads it spawns stay there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0);
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn binding_a_veth_falls_back_with_one_line_or_fails_naming_it() {
    let Some(ns) = Netns::create("veth") else {
        return;
    };
    ns.ip(&[
        "link", "add", "dmv0", "type", "veth", "peer", "name", "dmv1",
    ]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "dmv0"]);
    ns.ip(&["addr", "add", "10.77.0.2/24", "dev", "dmv1"]);
    ns.ip(&["link", "set", "dmv0", "up"]);
    ns.ip(&["link", "set", "dmv1", "up"]);
    // Traffic between our own addresses goes through the namespace's lo.
    ns.ip(&["link", "set", "lo", "up"]);
    let msg = ns.run(|| bind_refused("dmv0"));
    eprintln!("bind-rx on a veth, as the transport reports it: {msg}");
    // veth has no queue API either (this kernel: EOPNOTSUPP).
    assert!(msg.contains("EOPNOTSUPP"), "{msg}");
}
