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
