//! Every engine × zero-copy combination moves random bytes exactly, over
//! three NICs, in both directions at once; io_uring unavailable means epoll.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::sync::Mutex;

use common::{net_with, pair, pattern, T};
use tcpx::{EngineKind, HostMemory, Net, RecvBuf, ZeroCopy};

/// TCPX_URING is read by the probe: tests that touch it run alone.
static ENV: Mutex<()> = Mutex::new(());

fn stream(a: &Net, b: &Net, seed: u64) {
    let (send, recv) = pair(a, b);
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    let sizes: Vec<usize> = (0..60)
        .map(|i| {
            if i % 4 == 0 {
                next() % 3_000_000
            } else {
                next() % 200_000
            }
        })
        .collect();
    let mut window = std::collections::VecDeque::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut m = HostMemory::zeroed(n).unwrap();
        pattern(seed ^ i as u64, &mut m);
        let expect = m.to_vec();
        let src = a.reg_mr(m);
        let dst = b.reg_mr(HostMemory::zeroed(n + 1).unwrap());
        let rx = recv
            .irecv(&[RecvBuf {
                mr: &dst,
                offset: 0,
                len: n + 1,
                tag: i as i32,
            }])
            .unwrap()
            .unwrap();
        let tx = send.isend(&src, 0, n, i as i32).unwrap().unwrap();
        window.push_back((tx, rx, src, dst, expect));
        if window.len() == 6 {
            check(window.pop_front().unwrap());
        }
    }
    for w in window {
        check(w);
    }
}

type InFlight = (
    tcpx::Request,
    tcpx::Request,
    tcpx::MemoryRegion,
    tcpx::MemoryRegion,
    Vec<u8>,
);

fn check((mut tx, mut rx, _src, mut dst, expect): InFlight) {
    tx.wait(T).unwrap();
    assert_eq!(rx.wait(T).unwrap()[0], expect.len() as u64);
    drop(rx);
    assert!(dst.bytes().unwrap()[..expect.len()] == expect[..]);
}

#[test]
fn every_engine_and_zerocopy_mode_is_byte_exact() {
    let _g = ENV.lock().unwrap_or_else(|p| p.into_inner());
    for engine in [EngineKind::Epoll, EngineKind::Uring] {
        for zc in [ZeroCopy::Off, ZeroCopy::On, ZeroCopy::Auto] {
            let (a, b) = (net_with(engine, zc), net_with(engine, zc));
            if engine == EngineKind::Uring && a.engine() != EngineKind::Uring {
                eprintln!("io_uring unavailable on this kernel: uring combinations ran on epoll");
            }
            std::thread::scope(|s| {
                s.spawn(|| stream(&a, &b, 1));
                s.spawn(|| stream(&b, &a, 2));
            });
            if zc == ZeroCopy::On {
                assert!(a.stats().zerocopy_sends > 0, "{engine:?}: {:?}", a.stats());
            }
        }
    }
}

#[test]
fn unavailable_io_uring_falls_back_to_epoll_with_the_same_results() {
    let _g = ENV.lock().unwrap_or_else(|p| p.into_inner());
    std::env::set_var("TCPX_URING", "unavailable");
    let (a, b) = (
        net_with(EngineKind::Uring, ZeroCopy::Auto),
        net_with(EngineKind::Auto, ZeroCopy::Auto),
    );
    std::env::remove_var("TCPX_URING");
    assert_eq!(a.engine(), EngineKind::Epoll);
    assert_eq!(b.engine(), EngineKind::Epoll);
    stream(&a, &b, 3);
}

#[test]
fn closing_the_receiver_fails_uring_sends_in_flight() {
    let _g = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let a = net_with(EngineKind::Uring, ZeroCopy::Off);
    let (send, recv) = pair(&a, &a);
    // Far more than loopback socket buffers can absorb, so the send must stall.
    let big = a.reg_mr(HostMemory::zeroed(64 << 20).unwrap());
    let dst = a.reg_mr(HostMemory::zeroed(8 << 20).unwrap());
    // The first message completes; the second has no receive and stalls until the receiver closes.
    let mut rx = recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 0,
            len: 8 << 20,
            tag: 0,
        }])
        .unwrap()
        .unwrap();
    let _tx = send.isend(&big, 0, 1 << 20, 0).unwrap().unwrap();
    let mut tx2 = send.isend(&big, 0, 64 << 20, 0).unwrap().unwrap();
    let _ = rx.wait(T);
    drop(recv);
    let t0 = std::time::Instant::now();
    let e = loop {
        match tx2.test() {
            Err(e) => break e,
            Ok(Some(_)) => panic!("send completed with nobody receiving"),
            Ok(None) if t0.elapsed() > std::time::Duration::from_secs(5) => panic!("hang"),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    };
    assert!(matches!(e, tcpx::Error::PeerClosed), "{e}");
}
