//! Many concurrent requests, both directions at once, and a message over 4 GiB.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::collections::VecDeque;

use common::{pair, pattern, three_nics, T};
use tcpx::{HostMemory, Net, RecvBuf, RecvComm, SendComm};

/// Sizes skewed towards small, with odd values and a few multi-chunk ones.
fn sizes(seed: u64, n: usize) -> Vec<usize> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (x >> 33) as usize;
            match r % 10 {
                0..=5 => r % 20_000,
                6..=8 => r % 600_000,
                _ => r % 3_000_000,
            }
        })
        .collect()
}

const WINDOW: usize = 8;

fn sender(net: &Net, send: &SendComm, sizes: &[usize], seed: u64) {
    let mut inflight = VecDeque::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut m = HostMemory::zeroed(n).unwrap();
        pattern(seed + i as u64, &mut m);
        let mr = net.reg_mr(m);
        if inflight.len() == WINDOW {
            let (mut r, _mr): (tcpx::Request, _) = inflight.pop_front().unwrap();
            r.wait(T).unwrap();
        }
        let r = send.isend(&mr, 0, n, i as i32).unwrap().expect("slot");
        inflight.push_back((r, mr));
    }
    for (mut r, _) in inflight {
        r.wait(T).unwrap();
    }
}

fn receiver(net: &Net, recv: &RecvComm, sizes: &[usize], seed: u64) {
    let check = |i: usize, mut mr: tcpx::MemoryRegion, got: u64| {
        assert_eq!(got, sizes[i] as u64, "message {i}");
        let mut want = vec![0u8; sizes[i]];
        pattern(seed + i as u64, &mut want);
        assert!(
            mr.bytes().unwrap()[..sizes[i]] == want[..],
            "message {i} differs"
        );
    };
    let mut inflight = VecDeque::new();
    for (i, &n) in sizes.iter().enumerate() {
        if inflight.len() == WINDOW {
            let (j, mut r, mr): (usize, tcpx::Request, _) = inflight.pop_front().unwrap();
            let got = r.wait(T).unwrap()[0];
            drop(r);
            check(j, mr, got);
        }
        // Buffers a little larger than the message: sizes come from the sender.
        let mr = net.reg_mr(HostMemory::zeroed(n + 5).unwrap());
        let r = recv
            .irecv(&[RecvBuf {
                mr: &mr,
                offset: 0,
                len: n + 5,
                tag: i as i32,
            }])
            .unwrap()
            .expect("slot");
        inflight.push_back((i, r, mr));
    }
    for (j, mut r, mr) in inflight {
        let got = r.wait(T).unwrap()[0];
        drop(r);
        check(j, mr, got);
    }
}

#[test]
fn thousand_random_messages_both_directions_at_once() {
    let a = Net::init(three_nics()).unwrap();
    let b = Net::init(three_nics()).unwrap();
    let (ab_send, ab_recv) = pair(&a, &b);
    let (ba_send, ba_recv) = pair(&b, &a);
    let (s1, s2) = (sizes(1, 1000), sizes(2, 1000));
    std::thread::scope(|s| {
        s.spawn(|| sender(&a, &ab_send, &s1, 1000));
        s.spawn(|| receiver(&b, &ab_recv, &s1, 1000));
        s.spawn(|| sender(&b, &ba_send, &s2, 5000));
        s.spawn(|| receiver(&a, &ba_recv, &s2, 5000));
    });
}

#[test]
fn message_over_4_gib_arrives_intact() {
    let size = (4usize << 30) + 4099;
    let net = Net::init(three_nics()).unwrap();
    let (send, recv) = pair(&net, &net);
    let mut m = HostMemory::zeroed(size).unwrap();
    // Mark every page (and the tail) rather than every byte: cheap and still catches misplacement.
    for (i, page) in m.chunks_mut(4096).enumerate() {
        page[0] = i as u8;
        page[page.len() - 1] = (i >> 8) as u8 ^ 0x5A;
    }
    let src = net.reg_mr(m);
    let mut dst = net.reg_mr(HostMemory::zeroed(size).unwrap());
    let mut rx = recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 0,
            len: size,
            tag: 4,
        }])
        .unwrap()
        .unwrap();
    let mut tx = send.isend(&src, 0, size, 4).unwrap().unwrap();
    tx.wait(std::time::Duration::from_secs(120)).unwrap();
    assert_eq!(
        rx.wait(std::time::Duration::from_secs(120)).unwrap()[0],
        size as u64
    );
    drop(rx);
    for (i, page) in dst.bytes().unwrap().chunks(4096).enumerate() {
        assert_eq!(page[0], i as u8, "page {i}");
        assert_eq!(page[page.len() - 1], (i >> 8) as u8 ^ 0x5A, "page {i}");
    }
}

/// Receive posted, then the message sent, one at a time, over two NICs:
/// the chunks reach the receiving sockets while the control socket's
/// reader is still announcing their message. A socket that looked for the
/// placement before it went in and for the announcement after, dropped a
/// fresh chunk as a duplicate, and that message never completed (about one
/// in 5,000 messages hung). Every message must arrive, byte-exact at its
/// ends, within the deadline.
#[test]
fn one_at_a_time_messages_never_lose_a_chunk_to_the_announcement() {
    let cfg = tcpx::Config::loopback(&["127.0.0.1", "127.0.0.2"]).unwrap();
    let a = Net::init(cfg.clone()).unwrap();
    let b = Net::init(cfg).unwrap();
    let (send, recv) = pair(&a, &b);
    const AREA: usize = 64 << 20;
    let mut m = HostMemory::zeroed(AREA).unwrap();
    pattern(77, &mut m);
    let want = m.to_vec();
    let src = a.reg_mr(m);
    let mut dst = b.reg_mr(HostMemory::zeroed(AREA).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let mut n = 0usize;
    // Runs of one size, each larger than the lone-inline limit (two chunks
    // or more), from successive parts of the buffers.
    let sizes = [512 << 10, 1 << 20, (2 << 20) + 4097, 4 << 20];
    while n < 16_000 && std::time::Instant::now() < deadline {
        let len = sizes[(n / 500) % sizes.len()];
        let at = (n % (AREA / len)) * len;
        let at = at.min(AREA - len);
        let bufs = [RecvBuf {
            mr: &dst,
            offset: at,
            len,
            tag: 9,
        }];
        let mut rx = recv.irecv(&bufs).unwrap().unwrap();
        let mut tx = send.isend(&src, at, len, 9).unwrap().unwrap();
        let wait = std::time::Duration::from_secs(5);
        tx.wait(wait)
            .unwrap_or_else(|e| panic!("send {n} ({len} B): {e}"));
        let got = rx
            .wait(wait)
            .unwrap_or_else(|e| panic!("receive {n} ({len} B): {e}"));
        assert_eq!(got[0], len as u64);
        n += 1;
        if n % 1000 == 0 {
            drop(rx);
            let d = dst.bytes().unwrap();
            assert_eq!(d[at..at + 64], want[at..at + 64], "message {n}");
            assert_eq!(d[at + len - 64..at + len], want[at + len - 64..at + len]);
        }
    }
    assert!(n >= 3_000, "only {n} messages in the time allowed");
}
