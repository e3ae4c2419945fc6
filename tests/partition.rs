//! A peer that goes silent (its link cut, no FIN, no RST) fails the comm
//! within the configured peer timeout instead of hanging for minutes.
//! Runs between two network namespaces the test makes itself; skipped
//! (with a message) where that is not possible (not root, no `ip`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::os::fd::AsFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tcpx::{Config, Error, Handle, HostMemory, Net, RecvBuf};

struct Namespaces {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Namespaces {
    /// Two namespaces joined by a veth pair: 10.251.7.1 (a) and 10.251.7.2 (b).
    fn create() -> Option<Self> {
        let id = std::process::id();
        let (a, b) = (format!("tcpx-pa-{id}"), format!("tcpx-pb-{id}"));
        let ns = Namespaces { a, b };
        let ok = ip(&["netns", "add", &ns.a])
            && ip(&["netns", "add", &ns.b])
            && ip(&[
                "link", "add", "tcpxva", "netns", &ns.a, "type", "veth", "peer", "name", "tcpxvb",
                "netns", &ns.b,
            ])
            && ip(&["-n", &ns.a, "addr", "add", "10.251.7.1/24", "dev", "tcpxva"])
            && ip(&["-n", &ns.b, "addr", "add", "10.251.7.2/24", "dev", "tcpxvb"])
            && ip(&["-n", &ns.a, "link", "set", "tcpxva", "up"])
            && ip(&["-n", &ns.b, "link", "set", "tcpxvb", "up"])
            && ip(&["-n", &ns.a, "link", "set", "lo", "up"])
            && ip(&["-n", &ns.b, "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }

    /// Runs `f` on a thread inside namespace `name` (sockets it creates live there).
    fn enter(name: &str) {
        let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns handle");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

fn config(addr: &str) -> Config {
    let mut c = Config::loopback(&[addr]).unwrap();
    c.peer_timeout = Some(Duration::from_secs(3));
    c
}

#[test]
fn cut_link_fails_both_ends_within_the_peer_timeout() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to create network namespaces");
        return;
    }
    let Some(ns) = Namespaces::create() else {
        eprintln!("skipped: could not create network namespaces with `ip`");
        return;
    };
    let (htx, hrx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    let a = ns.a.clone();
    let receiver = std::thread::spawn(move || {
        Namespaces::enter(&a);
        let net = Net::init(config("10.251.7.1")).unwrap();
        let (h, mut l) = net.listen(0).unwrap();
        htx.send(h.to_bytes()).unwrap();
        let recv = l.accept_wait(Duration::from_secs(10)).unwrap();
        let dst = net.reg_mr(HostMemory::zeroed(256 << 20).unwrap());
        let mut r = recv
            .irecv(&[RecvBuf {
                mr: &dst,
                offset: 0,
                len: 256 << 20,
                tag: 0,
            }])
            .unwrap()
            .unwrap();
        rtx.send(()).unwrap();
        let t0 = Instant::now();
        let res = r.wait(Duration::from_secs(30));
        (res.map(|_| ()), t0.elapsed())
    });
    Namespaces::enter(&ns.b);
    let net = Net::init(config("10.251.7.2")).unwrap();
    let mut h = Handle::from_bytes(&hrx.recv().unwrap()).unwrap();
    let send = net
        .connect_wait(0, &mut h, Duration::from_secs(10))
        .unwrap();
    rrx.recv().unwrap();
    let src = net.reg_mr(HostMemory::zeroed(256 << 20).unwrap());
    let mut s = send.isend(&src, 0, 256 << 20, 0).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Cut the cable: both links down, so neither end sees a FIN or RST.
    assert!(ip(&["-n", &ns.a, "link", "set", "tcpxva", "down"]));
    let t0 = Instant::now();
    let sent = s.wait(Duration::from_secs(30));
    let send_after = t0.elapsed();
    let (received, recv_after) = receiver.join().unwrap();
    eprintln!(
        "sender failed after {send_after:?}: {sent:?}; receiver after {recv_after:?}: {received:?}"
    );
    // Neither end hears the other's heartbeats any more: both give up
    // within the 3 s peer timeout plus a tick.
    assert!(
        matches!(sent, Err(Error::PeerUnresponsive { after_ms: 3000 })),
        "{sent:?}"
    );
    assert!(
        send_after < Duration::from_secs(4),
        "sender took {send_after:?}"
    );
    assert!(
        matches!(received, Err(Error::PeerUnresponsive { after_ms: 3000 })),
        "{received:?}"
    );
    assert!(
        recv_after < Duration::from_secs(5),
        "receiver took {recv_after:?}"
    );
}
