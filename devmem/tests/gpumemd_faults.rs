//! The client against the mock daemon: the happy path, then every fault.
//! Each fault must give a typed error within the deadline, leak no fd and
//! leave no rule installed. Tests share one lock: they count the process's
//! open fds, which parallel tests would disturb.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devmem::gpumemd::mock::{Endpoint, Fault, MockConfig, MockGpumemd};
use devmem::gpumemd::{FlowRule, FrameError, GpumemdClient, GpumemdError};

static LOCK: Mutex<()> = Mutex::new(());

const DEADLINE: Duration = Duration::from_millis(500);
/// A call may overrun its deadline by scheduling noise, never by more.
const SLACK: Duration = Duration::from_millis(1500);
const PCI: &str = "0000:04:00.0";

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("procfs").count()
}

/// Runs `f` against a mock with `config`, checking that every fd opened on
/// the way (mock's and client's) is closed once both are gone.
fn with_mock(config: MockConfig, f: impl FnOnce(&mut MockGpumemd, &GpumemdClient)) {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let before = open_fds();
    {
        let mut mock = MockGpumemd::start_temp(config).expect("mock starts");
        let client = mock.client(DEADLINE);
        f(&mut mock, &client);
    }
    assert_eq!(open_fds(), before, "file descriptors leaked");
}

fn faulty(fault: Fault, on: Option<Endpoint>) -> MockConfig {
    MockConfig::default().with_fault(fault, on)
}

/// Runs `op`, asserting it returns within the deadline (plus slack).
fn timed<T>(what: &str, op: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = op();
    assert!(
        t.elapsed() < DEADLINE + SLACK,
        "{what} took {:?}, over its deadline",
        t.elapsed()
    );
    r
}

fn rule(port: u16) -> FlowRule {
    FlowRule::for_accepted(
        "10.0.0.1:5000".parse().unwrap(),
        format!("10.0.0.2:{port}").parse().unwrap(),
    )
    .with_gpu(PCI)
}

fn eventually(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every request kind, for faults that hit all endpoints alike.
fn all_ops(client: &GpumemdClient) -> Vec<(&'static str, GpumemdError)> {
    let mut out = Vec::new();
    let mut push = |name, r: Result<(), GpumemdError>| {
        out.push((name, r.expect_err(name)));
    };
    push(
        "queue_ids",
        timed("queue_ids", || client.queue_ids(PCI).map(drop)),
    );
    push(
        "rx_pool_fd",
        timed("rx_pool_fd", || client.rx_pool_fd(PCI).map(drop)),
    );
    push(
        "metadata",
        timed("metadata", || client.rx_pool_metadata(PCI).map(drop)),
    );
    push(
        "install",
        timed("install", || client.install_rule(&rule(1))),
    );
    push(
        "uninstall",
        timed("uninstall", || client.uninstall_rule(&rule(1))),
    );
    push(
        "register",
        timed("register", || client.register().map(drop)),
    );
    out
}

#[test]
fn healthy_daemon_serves_every_call() {
    with_mock(MockConfig::default(), |mock, client| {
        assert_eq!(client.queue_ids(PCI).unwrap(), vec![1, 2, 3, 4]);

        let pool = client.rx_pool(PCI).unwrap();
        assert_eq!(pool.metadata.size, 1 << 20);
        assert_eq!(pool.metadata.align, 4096);
        let st = nix::sys::stat::fstat(pool.fd.as_raw_fd()).unwrap();
        assert_eq!(st.st_size, 1 << 20, "the received fd is the mock's memfd");
        drop(pool);

        let reg = client.register().unwrap();
        assert!(reg.is_alive());
        assert_eq!(mock.registered_clients(), 1);
        reg.deregister().unwrap();
        eventually("deregistration", || mock.registered_clients() == 0);

        let reg = client.register().unwrap();
        drop(reg);
        eventually("deregistration on drop", || mock.registered_clients() == 0);

        let a = client.steer(rule(40000)).unwrap();
        let b = client.steer(rule(40001).with_queue(2)).unwrap();
        assert_eq!(
            mock.installed_rules(),
            vec![rule(40000), rule(40001).with_queue(2)]
        );
        a.withdraw().unwrap();
        assert_eq!(mock.installed_rules(), vec![rule(40001).with_queue(2)]);
        drop(b);
        assert!(mock.installed_rules().is_empty(), "drop withdraws the rule");
    });
}

#[test]
fn absent_daemon_is_reported_at_once() {
    with_mock(MockConfig::default(), |mock, client| {
        mock.stop();
        for (op, e) in all_ops(client) {
            assert!(
                matches!(e, GpumemdError::DaemonAbsent { .. }),
                "{op}: {e:?}"
            );
        }
        // The message tells the user what to do.
        let msg = client.queue_ids(PCI).unwrap_err().to_string();
        assert!(
            msg.contains("NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX"),
            "{msg}"
        );
    });
}

#[test]
fn accept_then_close_is_closed() {
    with_mock(faulty(Fault::AcceptThenClose, None), |_, client| {
        for (op, e) in all_ops(client) {
            assert!(matches!(e, GpumemdError::Closed { .. }), "{op}: {e:?}");
        }
    });
}

#[test]
fn slow_daemon_times_out_within_the_deadline() {
    with_mock(faulty(Fault::Delay(DEADLINE * 3), None), |mock, client| {
        for (op, e) in all_ops(client) {
            assert!(matches!(e, GpumemdError::TimedOut { .. }), "{op}: {e:?}");
        }
        // A late install still lands in the daemon; the client must withdraw it.
        mock.set_fault(Fault::None, None);
        client.uninstall_rule(&rule(1)).unwrap();
        eventually("late install withdrawn", || {
            let _ = client.uninstall_rule(&rule(1));
            mock.installed_rules().is_empty()
        });
    });
}

#[test]
fn hung_daemon_times_out_and_lets_go_of_the_connection() {
    with_mock(faulty(Fault::Hang, None), |mock, client| {
        for (op, e) in all_ops(client) {
            assert!(matches!(e, GpumemdError::TimedOut { .. }), "{op}: {e:?}");
        }
        assert_eq!(mock.requests_served(), 0, "a hung daemon answers nothing");
        assert!(mock.installed_rules().is_empty());
    });
}

#[test]
fn cut_length_header_is_malformed() {
    with_mock(faulty(Fault::MalformedLength, None), |_, client| {
        for (op, e) in all_ops(client) {
            if op == "rx_pool_fd" {
                // One byte without an fd: an fd reply with zero fds.
                assert!(
                    matches!(e, GpumemdError::UnexpectedFdCount { got: 0, .. }),
                    "{op}: {e:?}"
                );
                continue;
            }
            assert!(
                matches!(
                    e,
                    GpumemdError::Malformed {
                        source: FrameError::TooShort { need: 2, have: 1 },
                        ..
                    }
                ),
                "{op}: {e:?}"
            );
        }
    });
}

#[test]
fn truncated_payload_is_malformed() {
    with_mock(
        faulty(Fault::TruncatedPayload, Some(Endpoint::GpuMetadata)),
        |_, client| {
            let e = timed("metadata", || client.rx_pool_metadata(PCI)).unwrap_err();
            assert!(
                matches!(
                    e,
                    GpumemdError::Malformed {
                        source: FrameError::TooShort { need: 34, have: 7 },
                        ..
                    }
                ),
                "{e:?}"
            );
        },
    );
}

#[test]
fn garbage_payload_is_a_decode_error() {
    with_mock(
        faulty(Fault::GarbagePayload, Some(Endpoint::QueueIds)),
        |_, client| {
            let e = timed("queue_ids", || client.queue_ids(PCI)).unwrap_err();
            assert!(
                matches!(
                    e,
                    GpumemdError::Malformed {
                        source: FrameError::Decode(_),
                        ..
                    }
                ),
                "{e:?}"
            );
        },
    );
}

#[test]
fn unknown_oneof_field_is_an_unexpected_kind() {
    with_mock(faulty(Fault::UnknownOneof, None), |mock, client| {
        for (op, e) in all_ops(client) {
            let ok = match op {
                "queue_ids" | "metadata" => matches!(
                    e,
                    GpumemdError::Malformed {
                        source: FrameError::UnexpectedKind { .. },
                        ..
                    }
                ),
                "rx_pool_fd" => matches!(e, GpumemdError::UnexpectedFdCount { got: 0, .. }),
                // Anything but "Ok." is a refusal, as in the original.
                _ => matches!(e, GpumemdError::Refused { .. }),
            };
            assert!(ok, "{op}: {e:?}");
        }
        assert!(mock.installed_rules().is_empty());
    });
}

#[test]
fn fd_reply_without_fd_is_rejected() {
    with_mock(faulty(Fault::FdCount(0), None), |_, client| {
        let e = timed("rx_pool", || client.rx_pool(PCI)).unwrap_err();
        assert!(
            matches!(e, GpumemdError::UnexpectedFdCount { got: 0, .. }),
            "{e:?}"
        );
    });
}

#[test]
fn fd_reply_with_two_fds_is_rejected_and_both_closed() {
    // with_mock's fd count proves both received fds were closed.
    with_mock(faulty(Fault::FdCount(2), None), |_, client| {
        let e = timed("rx_pool", || client.rx_pool(PCI)).unwrap_err();
        assert!(
            matches!(e, GpumemdError::UnexpectedFdCount { got: 2, .. }),
            "{e:?}"
        );
    });
}

#[test]
fn pipe_instead_of_pool_is_rejected() {
    with_mock(faulty(Fault::WrongFdKind, None), |_, client| {
        let e = timed("rx_pool", || client.rx_pool(PCI)).unwrap_err();
        assert!(matches!(e, GpumemdError::BadPoolFd { .. }), "{e:?}");
        assert!(e.to_string().contains("pipe"), "{e}");
    });
}

#[test]
fn pool_smaller_than_advertised_is_rejected() {
    with_mock(faulty(Fault::ShortPool, None), |_, client| {
        let e = timed("rx_pool", || client.rx_pool(PCI)).unwrap_err();
        assert!(matches!(e, GpumemdError::BadPoolFd { .. }), "{e:?}");
    });
}

#[test]
fn refused_rule_is_an_error_and_not_installed() {
    with_mock(faulty(Fault::RefuseRules, None), |mock, client| {
        let e = timed("steer", || client.steer(rule(7))).unwrap_err();
        match &e {
            GpumemdError::Refused { reply, .. } => {
                assert!(reply.contains("No more rx rules"), "{reply}");
                assert!(reply.contains("status code 8"), "{reply}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        assert!(mock.installed_rules().is_empty());
    });
}

#[test]
fn unknown_gpu_is_refused_like_the_real_daemon() {
    with_mock(MockConfig::default(), |mock, client| {
        let other = "0000:99:00.0";
        // No pool sockets exist for a GPU the daemon does not serve.
        let e = timed("rx_pool", || client.rx_pool(other)).unwrap_err();
        assert!(matches!(e, GpumemdError::DaemonAbsent { .. }), "{e:?}");
        // Queue ids and rules answer with the daemon's error text + status.
        let e = timed("queue_ids", || client.queue_ids(other)).unwrap_err();
        assert!(
            matches!(e, GpumemdError::Refused { ref reply, .. } if reply.contains("not found")),
            "{e:?}"
        );
        let e = timed("rule", || client.install_rule(&rule(1).with_gpu(other))).unwrap_err();
        assert!(matches!(e, GpumemdError::Refused { .. }), "{e:?}");
        assert!(mock.installed_rules().is_empty());
    });
}

#[test]
fn wrong_pci_on_a_pool_socket_gets_the_daemons_answers() {
    with_mock(MockConfig::default(), |mock, client| {
        use devmem::gpumemd::conn::Conn;
        use devmem::gpumemd::UnixSocketProto;
        // get_gpu_metadata_<ours> asked for another GPU: "Not found." + status.
        let path = mock.prefix().join(format!("get_gpu_metadata_{PCI}"));
        let mut c = Conn::connect(&path, "test", DEADLINE).unwrap();
        c.send_proto(&UnixSocketProto::raw("0000:99:00.0")).unwrap();
        let reply = c.recv_proto().unwrap();
        assert_eq!(reply.raw_bytes(), Some(&b"Not found."[..]));
        assert_eq!(reply.status.map(|s| s.code), Some(3));
        // get_gpu_fd_<ours> asked for another GPU: silence until the deadline.
        let path = mock.prefix().join(format!("get_gpu_fd_{PCI}"));
        let mut c = Conn::connect(&path, "test", DEADLINE).unwrap();
        c.send_proto(&UnixSocketProto::raw("0000:99:00.0")).unwrap();
        let e = timed("fd", || c.recv_one_fd()).unwrap_err();
        assert!(matches!(e, GpumemdError::TimedOut { .. }), "{e:?}");
        let _ = client;
    });
}

#[test]
fn bad_pci_argument_is_rejected_before_connecting() {
    with_mock(MockConfig::default(), |mock, client| {
        for bad in ["", "../../etc/x", "a\0b"] {
            assert!(matches!(
                client.rx_pool(bad),
                Err(GpumemdError::InvalidArgument(_))
            ));
            assert!(matches!(
                client.queue_ids(bad),
                Err(GpumemdError::InvalidArgument(_))
            ));
        }
        assert_eq!(mock.requests_served(), 0);
    });
}

#[test]
fn registry_fault_only_hits_registration() {
    with_mock(
        faulty(Fault::AcceptThenClose, Some(Endpoint::Registry)),
        |mock, client| {
            let e = timed("register", || client.register()).unwrap_err();
            assert!(matches!(e, GpumemdError::Closed { .. }), "{e:?}");
            assert_eq!(client.queue_ids(PCI).unwrap(), vec![1, 2, 3, 4]);
            assert_eq!(mock.registered_clients(), 0);
        },
    );
}

#[test]
fn daemon_dying_mid_run_is_noticed_and_nothing_hangs() {
    with_mock(faulty(Fault::DieAfter(2), None), |mock, client| {
        let reg = client.register().unwrap(); // request 1
        let steered = client.steer(rule(9)).unwrap(); // request 2: then it dies
        eventually("registration loss noticed", || !reg.is_alive());
        assert!(!mock.is_running());
        let e = timed("queue_ids", || client.queue_ids(PCI)).unwrap_err();
        assert!(matches!(e, GpumemdError::DaemonAbsent { .. }), "{e:?}");
        // Withdrawing against a dead daemon fails fast; drops do not hang.
        let e = timed("withdraw", || steered.withdraw()).unwrap_err();
        assert!(matches!(e, GpumemdError::DaemonAbsent { .. }), "{e:?}");
        timed("drop registration", || drop(reg));
    });
}

#[test]
fn daemon_restart_mid_run_loses_registration_and_recovers() {
    with_mock(MockConfig::default(), |mock, client| {
        let reg = client.register().unwrap();
        let steered = client.steer(rule(11)).unwrap();
        let pool_before = client.rx_pool(PCI).unwrap();
        mock.restart().unwrap();
        eventually("registration loss noticed", || !reg.is_alive());
        drop(reg);
        // The restarted daemon serves again: re-register, re-import.
        let reg2 = client.register().unwrap();
        assert_eq!(mock.registered_clients(), 1);
        let pool_after = client.rx_pool(PCI).unwrap();
        assert_ne!(
            nix::sys::stat::fstat(pool_before.fd.as_raw_fd())
                .unwrap()
                .st_ino,
            nix::sys::stat::fstat(pool_after.fd.as_raw_fd())
                .unwrap()
                .st_ino,
            "a restarted daemon exports a new pool"
        );
        // Withdrawing a rule the new daemon never saw still answers Ok.
        steered.withdraw().unwrap();
        let again = client.steer(rule(12)).unwrap();
        drop(again);
        assert!(mock.installed_rules().is_empty());
        drop(reg2);
        eventually("deregistered", || mock.registered_clients() == 0);
    });
}

#[test]
fn dropping_the_client_side_leaves_no_rule_installed() {
    with_mock(MockConfig::default(), |mock, client| {
        let flows: Vec<_> = (0..8)
            .map(|i| client.steer(rule(20000 + i)).unwrap())
            .collect();
        assert_eq!(mock.installed_rules().len(), 8);
        drop(flows);
        assert!(mock.installed_rules().is_empty());
    });
}

#[test]
fn mock_binary_serves_and_stops_on_sigterm() {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("tcpxb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tcpx-gpumemd-mock"))
        .args([
            "--prefix",
            dir.to_str().unwrap(),
            "--pool-size",
            "2M",
            "--queue-ids",
            "7,8",
        ])
        .args(["--exit-after", "20"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = GpumemdClient::new(&dir, Duration::from_secs(2));
    eventually("mock binary listening", || client.queue_ids(PCI).is_ok());
    assert_eq!(client.queue_ids(PCI).unwrap(), vec![7, 8]);
    assert_eq!(client.rx_pool(PCI).unwrap().metadata.size, 2 << 20);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        !dir.join("rx_rule_manager").exists(),
        "sockets are removed on stop"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
