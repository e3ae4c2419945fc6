//! The transport with gpumemd: probe and path at init, one flow-steering
//! rule per data socket on accept, all withdrawn on close, and fallback or
//! failure according to `TCPX_DEVMEM`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::time::Duration;

use common::{exchange, pair, three_nics};
use devmem::gpumemd::mock::{MockConfig, MockGpumemd};
use tcpx::{Config, DataPath, DevmemMode, Error, Net};

fn with_daemon(prefix: &std::path::Path, mode: DevmemMode) -> Config {
    let mut c = three_nics();
    c.gpumemd_prefix = Some(prefix.to_path_buf());
    c.gpu_pci = Some(MockConfig::default().gpu_pci);
    c.devmem = mode;
    c
}

#[test]
fn daemon_registers_steers_every_data_socket_and_withdraws_on_close() {
    let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
    let mut cfg = with_daemon(mock.prefix(), DevmemMode::Require);
    cfg.gpumemd_register = true;
    cfg.flow_steering_wait = Duration::from_millis(20);
    let net = Net::init(cfg).unwrap();
    assert!(net.devices().iter().all(|d| d.path == DataPath::Devmem));
    assert_eq!(mock.registered_clients(), 1);

    let plain = Net::init(three_nics()).unwrap();
    let (send, recv) = pair(&plain, &net);
    let rules = mock.installed_rules();
    assert_eq!(
        rules.len(),
        recv.data_sockets(),
        "one rule per data socket: {rules:?}"
    );
    let queues = MockConfig::default().queue_ids;
    for r in &rules {
        assert_eq!(
            r.gpu_pci_addr.as_deref(),
            Some(MockConfig::default().gpu_pci.as_str())
        );
        assert!(queues.contains(&r.queue_id.unwrap()));
    }

    exchange(&plain, &net, &send, &recv, 1_234_567, 5);

    drop(recv);
    assert!(
        mock.installed_rules().is_empty(),
        "rules left behind: {:?}",
        mock.installed_rules()
    );
    drop(send);
    drop(net);
    let t0 = std::time::Instant::now();
    while mock.registered_clients() != 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        mock.registered_clients(),
        0,
        "registration outlived the transport"
    );
}

#[test]
fn absent_daemon_falls_back_or_fails_by_configuration() {
    let dir = std::env::temp_dir().join(format!("tcpx-no-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let net = Net::init(with_daemon(&dir, DevmemMode::Prefer)).unwrap();
    assert!(net.devices().iter().all(|d| d.path == DataPath::Host));
    let t0 = std::time::Instant::now();
    let e = Net::init(with_daemon(&dir, DevmemMode::Require))
        .err()
        .expect("require must fail");
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(e, Error::Devmem(ref d) if d.cause() == devmem::Cause::GpumemdAbsent),
        "{e}"
    );
    assert_eq!(e.code(), tcpx::ffi::TCPX_EGPUMEMD);
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn refused_rules_fail_accept_under_require_and_are_skipped_under_prefer() {
    use devmem::gpumemd::mock::{Endpoint, Fault};
    let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
    mock.set_fault(Fault::RefuseRules, Some(Endpoint::RuleInstall));
    let plain = Net::init(three_nics()).unwrap();

    let net = Net::init(with_daemon(mock.prefix(), DevmemMode::Prefer)).unwrap();
    let (send, recv) = pair(&plain, &net);
    assert!(mock.installed_rules().is_empty());
    drop((send, recv));

    let strict = Net::init(with_daemon(mock.prefix(), DevmemMode::Require)).unwrap();
    let (h, mut l) = strict.listen(0).unwrap();
    let mut h = h;
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = plain.connect_wait(0, &mut h, Duration::from_secs(5));
        });
        let e = l.accept_wait(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, Error::Gpumemd(_)), "{e}");
    });
}

/// gpumemd's per-exchange deadline, which bounds the accept and close paths in total.
const DEADLINE: Duration = devmem::gpumemd::DEFAULT_DEADLINE;

fn many_sockets(prefix: &std::path::Path, mode: DevmemMode) -> Config {
    let mut c = with_daemon(prefix, mode);
    c.sockets_per_nic = 4; // 12 data sockets, 12 rules
    c
}

#[test]
fn a_slow_or_hung_daemon_costs_an_accept_one_deadline_in_total() {
    use devmem::gpumemd::mock::{Endpoint, Fault};
    let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
    let plain = Net::init(many_sockets(mock.prefix(), DevmemMode::Off)).unwrap();
    let net = Net::init(many_sockets(mock.prefix(), DevmemMode::Prefer)).unwrap();
    // Each answer just inside the deadline: one rule after another, 12 would take 18 s.
    for fault in [Fault::Delay(DEADLINE * 3 / 4), Fault::Hang] {
        mock.set_fault(fault.clone(), Some(Endpoint::RuleInstall));
        let t0 = std::time::Instant::now();
        let (send, recv) = pair(&plain, &net);
        let took = t0.elapsed();
        assert!(
            took < DEADLINE + Duration::from_secs(1),
            "{fault:?}: accept took {took:?}"
        );
        exchange(&plain, &net, &send, &recv, 100_000, 6);
    }

    let strict = Net::init(many_sockets(mock.prefix(), DevmemMode::Require)).unwrap();
    let (h, mut l) = strict.listen(0).unwrap();
    let mut h = h;
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = plain.connect_wait(0, &mut h, Duration::from_secs(5));
        });
        let t0 = std::time::Instant::now();
        let e = l.accept_wait(Duration::from_secs(10)).unwrap_err();
        assert!(matches!(e, Error::Gpumemd(_)), "{e}");
        assert!(t0.elapsed() < DEADLINE + Duration::from_secs(1));
    });
}

#[test]
fn closing_against_a_hung_daemon_takes_one_deadline_whatever_the_rules() {
    use devmem::gpumemd::mock::{Endpoint, Fault};
    let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
    let plain = Net::init(many_sockets(mock.prefix(), DevmemMode::Off)).unwrap();
    let net = Net::init(many_sockets(mock.prefix(), DevmemMode::Require)).unwrap();
    let (send, recv) = pair(&plain, &net);
    assert_eq!(mock.installed_rules().len(), 12);
    mock.set_fault(Fault::Hang, Some(Endpoint::RuleUninstall));
    let t0 = std::time::Instant::now();
    drop(recv);
    let took = t0.elapsed();
    assert!(
        took < DEADLINE + Duration::from_secs(1),
        "close took {took:?} (one rule after another: 12 deadlines)"
    );
    drop(send);
    // The daemon recovers: the rules it did not confirm are withdrawn in the background.
    mock.set_fault(Fault::None, None);
    let t0 = std::time::Instant::now();
    while !mock.installed_rules().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "rules left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
}
