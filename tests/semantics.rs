//! Completion semantics after errors (docs/PROTOCOL.md, "Completion"): a
//! failed request reports only once nothing in the transport can touch
//! its buffers, a failed grouped receive consumes exactly its messages,
//! and the comm goes on with the next message in the next receive.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::time::Duration;

use common::{net_with, pair, pattern, three_nics, T};
use tcpx::{EngineKind, Error, HostMemory, MemoryRegion, Net, RecvBuf, ZeroCopy};

const MARK: u8 = 0xEE;

fn filled(net: &Net, n: usize, seed: u64) -> (MemoryRegion, Vec<u8>) {
    let mut m = HostMemory::zeroed(n).unwrap();
    pattern(seed, &mut m);
    let v = m.to_vec();
    (net.reg_mr(m), v)
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize % n
    }
}

/// Finding 1's shape, `rounds` times on one comm pair: a receive of
/// `{A: a+1 bytes tag 1, B: 10 bytes tag 2}` meets `a` bytes with tag 1,
/// then a message that fails it (too big for B, or a foreign tag), then
/// `c` bytes with tag 3 go to the next receive, posted into A's memory as
/// soon as the failure is reported. Nothing of the first message may
/// land after the report, and the third must arrive whole.
fn failed_groups_then_reuse(tx: &Net, rx: &Net, rounds: usize, seed: u64) {
    let (send, recv) = pair(tx, rx);
    const MAX: usize = 1 << 20;
    let mut big = rx.reg_mr(HostMemory::zeroed(MAX + 1).unwrap());
    let small = rx.reg_mr(HostMemory::zeroed(10).unwrap());
    let mut rng = Rng(seed);
    for round in 0..rounds {
        let a = 1 + rng.below(MAX);
        let c = 1 + rng.below(MAX);
        let truncate = round % 2 == 0;
        // The failing message: inline or chunked, too big for B or foreign.
        let f_len = if rng.below(2) == 0 {
            100
        } else {
            70_000 + rng.below(200_000)
        };
        let f_tag = if truncate { 2 } else { 9 };
        let (m1, _) = filled(tx, a, seed ^ (round as u64) << 1);
        let (mf, _) = filled(tx, f_len, 7);
        let (m3, want3) = filled(tx, c, seed ^ ((round as u64) << 1 | 1));
        let mut r1 = recv
            .irecv(&[
                RecvBuf {
                    mr: &big,
                    offset: 0,
                    len: a + 1,
                    tag: 1,
                },
                RecvBuf {
                    mr: &small,
                    offset: 0,
                    len: 10,
                    tag: 2,
                },
            ])
            .unwrap()
            .unwrap();
        let mut s1 = send.isend(&m1, 0, a, 1).unwrap().unwrap();
        let mut sf = send.isend(&mf, 0, f_len, f_tag).unwrap().unwrap();
        let mut s3 = send.isend(&m3, 0, c, 3).unwrap().unwrap();
        let e = r1.wait(T).unwrap_err();
        match (truncate, &e) {
            (
                true,
                Error::Truncated {
                    tag: 2,
                    message,
                    buffer: 10,
                },
            ) => assert_eq!(*message, f_len as u64),
            (false, Error::TagMismatch(9)) => {}
            _ => panic!("round {round}: {e:?}"),
        }
        drop(r1);
        // Reported means let go: the memory is ours again at once.
        big.bytes_mut()
            .expect("no transport reference after the report")
            .fill(MARK);
        let mut r2 = recv
            .irecv(&[RecvBuf {
                mr: &big,
                offset: 0,
                len: MAX + 1,
                tag: 3,
            }])
            .unwrap()
            .unwrap();
        assert_eq!(r2.wait(T).unwrap()[0], c as u64, "round {round}");
        drop(r2);
        let got = big.bytes().unwrap();
        assert!(
            got[..c] == want3[..],
            "round {round}: the next message differs"
        );
        assert!(
            got[c..].iter().all(|&b| b == MARK),
            "round {round}: bytes landed after the report"
        );
        s1.wait(T).unwrap();
        s3.wait(T).unwrap();
        let sent = sf.wait(T);
        if f_len > 65536 {
            assert_eq!(
                sent.unwrap_err(),
                e,
                "round {round}: the sender learns the refusal"
            );
        } else {
            sent.unwrap();
        }
    }
}

#[test]
fn reuse_after_a_failed_group_is_byte_exact_for_every_engine_and_zerocopy() {
    for engine in [EngineKind::Epoll, EngineKind::Uring] {
        for zc in [ZeroCopy::Off, ZeroCopy::On, ZeroCopy::Auto] {
            let (a, b) = (net_with(engine, zc), net_with(engine, zc));
            failed_groups_then_reuse(&a, &b, 200, 0x5eed ^ zc as u64);
        }
    }
}

#[test]
fn a_group_that_met_a_foreign_tag_takes_no_more_messages() {
    // Finding 2: the failed group must not eat the next tag-2 message.
    let net = Net::init(three_nics()).unwrap();
    let (send, recv) = pair(&net, &net);
    for size in [33usize, 300_001] {
        let mut dst: Vec<MemoryRegion> = (0..4)
            .map(|_| net.reg_mr(HostMemory::zeroed(size).unwrap()))
            .collect();
        let mut r1 = recv
            .irecv(&[
                RecvBuf {
                    mr: &dst[0],
                    offset: 0,
                    len: size,
                    tag: 1,
                },
                RecvBuf {
                    mr: &dst[1],
                    offset: 0,
                    len: size,
                    tag: 2,
                },
            ])
            .unwrap()
            .unwrap();
        let mut r2 = recv
            .irecv(&[RecvBuf {
                mr: &dst[2],
                offset: 0,
                len: size,
                tag: 2,
            }])
            .unwrap()
            .unwrap();
        let mut r3 = recv
            .irecv(&[RecvBuf {
                mr: &dst[3],
                offset: 0,
                len: size,
                tag: 2,
            }])
            .unwrap()
            .unwrap();
        let msgs: Vec<(MemoryRegion, Vec<u8>, i32)> = [1, 9, 2, 2]
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let (m, v) = filled(&net, size, 100 + i as u64);
                (m, v, t)
            })
            .collect();
        let mut sends: Vec<_> = msgs
            .iter()
            .map(|(m, _, t)| send.isend(m, 0, size, *t).unwrap().unwrap())
            .collect();
        assert_eq!(r1.wait(T).unwrap_err(), Error::TagMismatch(9));
        assert_eq!(r2.wait(T).unwrap()[0], size as u64);
        assert_eq!(r3.wait(T).unwrap()[0], size as u64);
        drop((r1, r2, r3));
        assert!(
            dst[0].bytes().unwrap() == &msgs[0].1[..],
            "tag 1 went to its buffer"
        );
        assert!(
            dst[1].bytes().unwrap().iter().all(|&b| b == 0),
            "the released buffer stays untouched"
        );
        assert!(
            dst[2].bytes().unwrap() == &msgs[2].1[..],
            "the first tag-2 message goes to the next receive"
        );
        assert!(
            dst[3].bytes().unwrap() == &msgs[3].1[..],
            "and the second to the one after"
        );
        let sent: Vec<_> = sends.iter_mut().map(|s| s.wait(T)).collect();
        assert!(sent[0].is_ok() && sent[2].is_ok() && sent[3].is_ok());
        if size > 65536 {
            assert_eq!(sent[1], Err(Error::TagMismatch(9)));
        }
    }
}

#[test]
fn a_closed_comm_reports_in_flight_receives_only_after_letting_go() {
    let net = Net::init(three_nics()).unwrap();
    for _ in 0..5 {
        let (send, recv) = pair(&net, &net);
        let n = 64 << 20;
        let (src, _) = filled(&net, n, 1);
        let mut dst = net.reg_mr(HostMemory::zeroed(n).unwrap());
        let mut r = recv
            .irecv(&[RecvBuf {
                mr: &dst,
                offset: 0,
                len: n,
                tag: 0,
            }])
            .unwrap()
            .unwrap();
        let _s = send.isend(&src, 0, n, 0).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5)); // mid-message
        drop(recv);
        assert_eq!(r.wait(T).unwrap_err(), Error::Closed);
        drop(r);
        dst.bytes_mut().expect("let go").fill(MARK);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            dst.bytes().unwrap().iter().all(|&b| b == MARK),
            "written after the report"
        );
    }
}

#[test]
fn a_peer_that_closes_is_told_apart_from_one_that_died() {
    let net = Net::init(three_nics()).unwrap();
    let big = net.reg_mr(HostMemory::zeroed(8 << 20).unwrap());
    // The receiver closes: the sender's requests in flight say so.
    let (send, recv) = pair(&net, &net);
    let mut s = send.isend(&big, 0, 8 << 20, 0).unwrap().unwrap();
    drop(recv);
    assert_eq!(s.wait(T).unwrap_err(), Error::PeerClosed);
    assert_eq!(send.isend(&big, 0, 1, 0).unwrap_err(), Error::PeerClosed);
    // The sender closes: the receiver's posted receive says so.
    let (send, recv) = pair(&net, &net);
    let mut r = recv
        .irecv(&[RecvBuf {
            mr: &big,
            offset: 0,
            len: 10,
            tag: 0,
        }])
        .unwrap()
        .unwrap();
    drop(send);
    assert_eq!(r.wait(T).unwrap_err(), Error::PeerClosed);
}

/// Returns once the transfer is under way: a chunk placed on some data
/// socket (10 s at most). Not every socket: the scheduler may keep a slow
/// one idle for a while on a loaded machine.
fn transfer_under_way(stats: impl Fn() -> Vec<tcpx::SocketStats>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stats().iter().any(|s| s.counts.chunks_received > 0) {
        assert!(std::time::Instant::now() < deadline, "no data socket moved");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// No data socket of either end counts as failed or stalled: its socket
/// counters after the ends had time to judge (`PEER_END_GRACE`).
fn no_socket_failed(stats: impl Fn() -> Vec<tcpx::SocketStats>, who: &str) {
    std::thread::sleep(Duration::from_millis(500));
    for s in stats() {
        let c = &s.counts;
        assert_eq!((c.failures, c.stalls), (0, 0), "{who} socket {}", s.index);
    }
}

#[test]
fn a_peer_that_closes_mid_transfer_fails_none_of_its_sockets() {
    let net = Net::init(three_nics()).unwrap();
    // Large enough to be still under way when an end closes, on a machine
    // that moves 16 GB/s (64 MiB once finished within a 20 ms nap there);
    // untouched memory costs nothing to send.
    let n = 1 << 30;
    let src = net.reg_mr(HostMemory::zeroed(n).unwrap());
    let dst = net.reg_mr(HostMemory::zeroed(n).unwrap());
    let buf = || {
        [RecvBuf {
            mr: &dst,
            offset: 0,
            len: n,
            tag: 0,
        }]
    };
    // The receiver closes while chunks are in flight: the sender's
    // data sockets are reset, and the Bye explains it.
    let (send, recv) = pair(&net, &net);
    let mut r = recv.irecv(&buf()).unwrap().unwrap();
    let mut s = send.isend(&src, 0, n, 0).unwrap().unwrap();
    transfer_under_way(|| recv.socket_stats());
    drop(recv);
    assert_eq!(r.wait(T).unwrap_err(), Error::Closed);
    assert_eq!(s.wait(T).unwrap_err(), Error::PeerClosed);
    no_socket_failed(|| send.socket_stats(), "sender");
    // The sender closes: the receiver's data sockets end after its Bye.
    let (send, recv) = pair(&net, &net);
    let mut r = recv.irecv(&buf()).unwrap().unwrap();
    let mut s = send.isend(&src, 0, n, 0).unwrap().unwrap();
    transfer_under_way(|| recv.socket_stats());
    drop(send);
    assert_eq!(s.wait(T).unwrap_err(), Error::Closed);
    assert_eq!(r.wait(T).unwrap_err(), Error::PeerClosed);
    no_socket_failed(|| recv.socket_stats(), "receiver");
}
