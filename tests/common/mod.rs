//! Shared fixtures: a connected comm pair over loopback "NICs".
#![allow(dead_code)]

pub mod child;
pub mod lab;

use std::time::Duration;

use tcpx::{Config, EngineKind, HostMemory, Net, RecvBuf, RecvComm, SendComm, ZeroCopy};

pub const T: Duration = Duration::from_secs(20);

/// Three loopback addresses stand in for three NICs.
pub fn three_nics() -> Config {
    Config::loopback(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]).unwrap()
}

/// Three NICs on `engine` with `zerocopy` (from 4 KiB), 128 KiB chunks.
pub fn net_with(engine: EngineKind, zerocopy: ZeroCopy) -> Net {
    let mut c = three_nics();
    c.engine = engine;
    c.zerocopy = zerocopy;
    c.min_zcopy_size = 4096;
    c.chunk_size = 128 << 10;
    Net::init(c).unwrap()
}

/// Connects `a` (sender) to `b` (receiver) on device 0.
pub fn pair(a: &Net, b: &Net) -> (SendComm, RecvComm) {
    let (h, mut l) = b.listen(0).unwrap();
    let mut h = tcpx::Handle::from_bytes(&h.to_bytes()).unwrap();
    std::thread::scope(|s| {
        let acc = s.spawn(move || l.accept_wait(T).unwrap());
        let send = a.connect_wait(0, &mut h, T).unwrap();
        (send, acc.join().unwrap())
    })
}

/// Deterministic pseudo-random bytes (xorshift), cheap even in debug builds.
pub fn pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Sends `n` pattern bytes (`seed`) from `a`'s comm to `b`'s and checks they arrive exactly.
pub fn exchange(a: &Net, b: &Net, send: &SendComm, recv: &RecvComm, n: usize, seed: u64) {
    let mut m = HostMemory::zeroed(n).unwrap();
    pattern(seed, &mut m);
    let expect = m.to_vec();
    let src = a.reg_mr(m);
    let mut dst = b.reg_mr(HostMemory::zeroed(n).unwrap());
    let tag = seed as i32;
    let mut rx = recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 0,
            len: n,
            tag,
        }])
        .unwrap()
        .expect("request slot");
    send.isend(&src, 0, n, tag)
        .unwrap()
        .expect("request slot")
        .wait(T)
        .unwrap();
    assert_eq!(rx.wait(T).unwrap()[0], n as u64);
    drop(rx);
    assert!(dst.bytes().unwrap() == &expect[..], "{n} bytes differ");
}

/// `n` pseudo-random sizes below 3 MB from `seed`, then the edges: empty,
/// one byte, just past 64 KiB, three pages and a byte, and `largest`.
pub fn odd_sizes(seed: u64, n: usize, largest: usize) -> Vec<usize> {
    let mut x = seed;
    let mut v: Vec<usize> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % 3_000_000
        })
        .collect();
    v.extend([0, 1, 65_537, 4096 * 3 + 1, largest]);
    v
}
