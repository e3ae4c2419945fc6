//! Receive comms driven by their owner (`take_over_progress` +
//! `wait_progress`), and small sends batched by `isend_more`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::time::{Duration, Instant};

use common::{pair, pattern, T};
use tcpx::{Config, HostMemory, Net, RecvBuf, RecvComm, Request};

/// Longer than any wake-up; a wait that lasts it slept through a completion.
const MISSED: Duration = Duration::from_secs(4);

/// Waits like a server thread would: asleep in `wait_progress` between polls.
fn wait_owner(recv: &RecvComm, req: &mut Request) -> u64 {
    let start = Instant::now();
    loop {
        let w = req.waiter();
        if let Some(s) = req.test().unwrap() {
            return s[0];
        }
        let t = Instant::now();
        recv.wait_progress(&w, MISSED + Duration::from_secs(1));
        assert!(
            t.elapsed() < MISSED,
            "wait_progress slept through a completion"
        );
        assert!(start.elapsed() < T, "receive never completed");
    }
}

#[test]
fn owner_driven_receives_wake_for_announcements_and_for_striped_data() {
    // Small messages travel on the control socket (the owner's poll wakes on
    // it), large ones over the data sockets (the workers wake it through the
    // comm's eventfd). The sender pauses so the receiver is asleep each time.
    let net = Net::init(Config::loopback(&["127.0.0.1", "127.0.0.2"]).unwrap()).unwrap();
    let (send, recv) = pair(&net, &net);
    recv.take_over_progress().unwrap();
    let sizes = [
        1usize,
        4099,
        65_536,
        (3 << 20) + 7,
        77,
        (1 << 20) - 3,
        0,
        12_345,
    ];
    let msgs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut v = vec![0u8; n];
            pattern(i as u64 + 11, &mut v);
            v
        })
        .collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for (i, m) in msgs.iter().enumerate() {
                std::thread::sleep(Duration::from_millis(20));
                let src = net.reg_mr(HostMemory::from_slice(m).unwrap());
                let mut r = send.isend(&src, 0, m.len(), i as i32).unwrap().unwrap();
                r.wait(T).unwrap();
            }
        });
        for (i, m) in msgs.iter().enumerate() {
            let mut dst = net.reg_mr(HostMemory::zeroed(m.len() + 1).unwrap());
            let buf = RecvBuf {
                mr: &dst,
                offset: 0,
                len: m.len() + 1,
                tag: i as i32,
            };
            let mut req = recv.irecv(&[buf]).unwrap().unwrap();
            assert_eq!(wait_owner(&recv, &mut req), m.len() as u64);
            drop(req);
            assert!(
                dst.bytes().unwrap()[..m.len()] == m[..],
                "message {i} differs"
            );
        }
    });
}

#[test]
fn isend_more_batches_small_sends_and_a_test_sends_them() {
    let net = Net::init(Config::loopback(&["127.0.0.1"]).unwrap()).unwrap();
    let (send, recv) = pair(&net, &net);
    let sizes = [5usize, 300, 1 << 16, 9, (2 << 20) + 1, 4];
    let mut src = HostMemory::zeroed(sizes.iter().sum()).unwrap();
    pattern(7, &mut src);
    let expect = src.to_vec();
    let src = net.reg_mr(src);
    let mut dst = net.reg_mr(HostMemory::zeroed(expect.len()).unwrap());
    let mut at = 0;
    let mut recvs = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let buf = RecvBuf {
            mr: &dst,
            offset: at,
            len: n,
            tag: i as i32,
        };
        recvs.push(recv.irecv(&[buf]).unwrap().unwrap());
        at += n;
    }
    // Two held back, then one that is never followed: its test must send all three.
    let mut at = 0;
    let mut sends = Vec::new();
    for (i, &n) in sizes[..3].iter().enumerate() {
        sends.push(send.isend_more(&src, at, n, i as i32).unwrap().unwrap());
        at += n;
    }
    sends[2].wait(T).unwrap();
    for r in &mut recvs[..3] {
        r.wait(T).unwrap();
    }
    // Held back, then followed by a large send (data sockets) and a plain one.
    for (i, &n) in sizes.iter().enumerate().skip(3) {
        let r = if i == 3 {
            send.isend_more(&src, at, n, i as i32)
        } else {
            send.isend(&src, at, n, i as i32)
        };
        sends.push(r.unwrap().unwrap());
        at += n;
    }
    for (s, r) in sends.iter_mut().zip(recvs.iter_mut()) {
        s.wait(T).unwrap();
        r.wait(T).unwrap();
    }
    drop(recvs);
    assert!(dst.bytes().unwrap() == &expect[..], "bytes differ");
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// A receive comm keeps the last few small messages it read in its
/// control socket (their ACK leaves later), and the socket reads ready
/// while they are there: a wait that outlasts its spin must drop them
/// before it sleeps, or it polls a ready socket until its deadline. So
/// after three small messages, a 400 ms wait for a fourth that never
/// comes, and the same in `wait_progress`, sleep.
#[test]
fn long_waits_sleep_after_small_messages() {
    let net = Net::init(Config::loopback(&["127.0.0.1", "127.0.0.2"]).unwrap()).unwrap();
    let (send, recv) = pair(&net, &net);
    let src = net.reg_mr(HostMemory::zeroed(64).unwrap());
    let dst = net.reg_mr(HostMemory::zeroed(64).unwrap());
    let buf = [RecvBuf {
        mr: &dst,
        offset: 0,
        len: 64,
        tag: 0,
    }];
    let send_one = || {
        let mut s = send.isend(&src, 0, 64, 0).unwrap().unwrap();
        s.wait(T).unwrap();
    };
    for _ in 0..3 {
        let mut r = recv.irecv(&buf).unwrap().unwrap();
        send_one();
        assert_eq!(r.wait(T).unwrap()[0], 64);
    }
    let wait = Duration::from_millis(400);
    let mut r = recv.irecv(&buf).unwrap().unwrap();
    let cpu = thread_cpu();
    assert!(matches!(r.wait(wait), Err(tcpx::Error::Timeout { .. })));
    let spent = thread_cpu() - cpu;
    assert!(spent < wait / 4, "a {wait:?} wait spent {spent:?} of CPU");
    let cpu = thread_cpu();
    let t = Instant::now();
    recv.wait_progress(&r.waiter(), wait);
    assert!(
        t.elapsed() >= wait - Duration::from_millis(50),
        "woke for nothing"
    );
    let spent = thread_cpu() - cpu;
    assert!(spent < wait / 4, "wait_progress spent {spent:?} of CPU");
    // The comm still works: the fourth message arrives.
    send_one();
    assert_eq!(r.wait(T).unwrap()[0], 64);
}
