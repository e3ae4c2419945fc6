//! The ethtool backend against a real driver without ntuple filters: a veth
//! pair in a network namespace this test creates (and always deletes).
//! Skips with a message when not root or `ip` is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use flowsteer::ethtool::EthtoolSteering;
use flowsteer::{FlowTuple, SteerError, Steering};

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
        // Unique per process and test, so parallel tests do not collide.
        let name = format!("tcpxfs-{}-{tag}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Err(e) => {
                eprintln!("SKIP: `ip` (iproute2) not runnable: {e}");
                None
            }
            Ok(o) if !o.status.success() => {
                eprintln!(
                    "SKIP: ip netns add failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Ok(_) => Some(Netns { name }),
        }
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {:?}: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` on a thread that has entered this namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns file");
            // SAFETY: setns on a valid namespace fd; it changes only this
            // thread's network namespace, and the thread ends with `f`.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn tuple() -> FlowTuple {
    FlowTuple {
        src: "10.9.0.1:40000".parse().unwrap(),
        dst: "10.9.0.2:5201".parse().unwrap(),
    }
}

#[test]
fn veth_reports_ntuple_not_supported() {
    let Some(ns) = Netns::create("a") else { return };
    ns.ip(&[
        "link", "add", "tcpxv0", "type", "veth", "peer", "name", "tcpxv1",
    ]);
    ns.ip(&["link", "set", "tcpxv0", "up"]);
    let (install, missing, rules) = ns.run(|| {
        let s = EthtoolSteering::new("tcpxv0").unwrap();
        let install = s.install(tuple(), 1).map(|h| h.detach());
        // The host's interfaces are invisible from inside the namespace.
        let missing = EthtoolSteering::new("tcpxv9")
            .unwrap()
            .install(tuple(), 1)
            .map(|h| h.detach());
        let rules = s.rule_table();
        (install, missing, rules)
    });
    let err = install.unwrap_err();
    assert!(
        matches!(err, SteerError::NotSupported { ref ifname } if ifname == "tcpxv0"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "NIC tcpxv0 does not support ntuple filters (ethtool -K tcpxv0 ntuple on)"
    );
    let err = missing.unwrap_err();
    assert!(matches!(err, SteerError::NoSuchInterface { .. }), "{err}");
    assert!(
        matches!(rules, Err(SteerError::NotSupported { .. })),
        "{rules:?}"
    );
}

#[test]
fn backend_keeps_the_namespace_it_was_made_in() {
    let Some(ns) = Netns::create("b") else { return };
    ns.ip(&[
        "link", "add", "tcpxw0", "type", "veth", "peer", "name", "tcpxw1",
    ]);
    // Made inside the namespace, used from this (host) thread.
    let s = ns.run(|| EthtoolSteering::new("tcpxw0").unwrap());
    let err = s.install(tuple(), 0).unwrap_err();
    assert!(matches!(err, SteerError::NotSupported { .. }), "{err}");
}
