//! Byte-exact transfers through the public API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::time::Duration;

use common::{exchange, net_with, pair, pattern, three_nics, T};
use tcpx::{Config, EngineKind, Error, HostMemory, Net, RecvBuf, SendComm, ZeroCopy};

fn send_recv(net: &Net, sizes: &[usize]) {
    let (send, recv) = pair(net, net);
    for (i, &size) in sizes.iter().enumerate() {
        let mut src = HostMemory::zeroed(size).unwrap();
        pattern(i as u64 + 1, &mut src);
        let expect = src.to_vec();
        let src = net.reg_mr(src);
        let mut dst = net.reg_mr(HostMemory::zeroed(size + 3).unwrap());
        let mut rx = recv
            .irecv(&[RecvBuf {
                mr: &dst,
                offset: 1,
                len: size + 2,
                tag: 5,
            }])
            .unwrap()
            .unwrap();
        let mut tx = send.isend(&src, 0, size, 5).unwrap().unwrap();
        assert_eq!(tx.wait(T).unwrap().as_slice(), &[size as u64]);
        assert_eq!(rx.wait(T).unwrap().as_slice(), &[size as u64]);
        drop(rx);
        let got = dst.bytes().unwrap();
        assert_eq!(got[0], 0);
        assert!(got[1..1 + size] == expect[..], "size {size} differs");
        assert!(got[1 + size..].iter().all(|&b| b == 0));
    }
}

#[test]
fn odd_sizes_arrive_byte_exact_over_three_nics() {
    let net = Net::init(three_nics()).unwrap();
    send_recv(
        &net,
        &[
            0,
            1,
            7,
            4095,
            16 * 1024,
            16 * 1024 + 1,
            100_003,
            524_289,
            3 * 524_288 + 17,
            9_999_991,
        ],
    );
}

#[test]
fn small_chunks_spread_over_many_sockets() {
    let mut cfg = three_nics();
    cfg.chunk_size = 4096;
    cfg.sockets_per_nic = 3;
    cfg.inline_threshold = 0;
    cfg.inline_idle_max = 0;
    let net = Net::init(cfg).unwrap();
    send_recv(&net, &[0, 1, 4096, 4097, 65_537, 1_000_001]);
}

#[test]
fn sockets_dealt_to_several_workers_per_nic() {
    let mut cfg = three_nics();
    cfg.chunk_size = 4096;
    cfg.sockets_per_nic = 3;
    cfg.workers_per_nic = 2;
    cfg.inline_threshold = 0;
    cfg.inline_idle_max = 0;
    let net = Net::init(cfg).unwrap();
    // Two comms, so sockets of both parities land on both workers.
    send_recv(&net, &[1, 4097, 65_537, 1_000_001]);
    send_recv(&net, &[0, 8191, 3_000_017]);
}

fn chunks_sent(send: &SendComm) -> u64 {
    send.socket_stats()
        .iter()
        .map(|s| s.counts.chunks_sent)
        .sum()
}

/// Window-1 mid-size messages (lone), a late receiver's, and four at once.
fn lone_messages(a: &Net, b: &Net, seed: u64) {
    let (send, recv) = pair(a, b);
    let lone = [65_537, 100_003, 131_072, 200_001, 262_143, 262_144];
    for (i, &n) in lone.iter().enumerate() {
        exchange(a, b, &send, &recv, n, seed * 100 + i as u64);
    }
    assert_eq!(
        chunks_sent(&send),
        0,
        "lone messages up to 256 KiB go inline"
    );
    // Sent before its receive is posted: it waits in the receiver.
    let n = 199_999;
    let mut m = HostMemory::zeroed(n).unwrap();
    pattern(seed, &mut m);
    let expect = m.to_vec();
    let src = a.reg_mr(m);
    let mut tx = send.isend(&src, 0, n, 9).unwrap().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    // Like a chunked one, it is done once placed.
    assert!(tx.test().unwrap().is_none(), "done before its receive");
    let mut dst = b.reg_mr(HostMemory::zeroed(n + 5).unwrap());
    let mut rx = recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 5,
            len: n,
            tag: 9,
        }])
        .unwrap()
        .unwrap();
    assert_eq!(rx.wait(T).unwrap().as_slice(), &[n as u64]);
    assert_eq!(tx.wait(T).unwrap().as_slice(), &[n as u64]);
    drop(rx);
    assert!(dst.bytes().unwrap()[5..] == expect[..]);
    assert_eq!(chunks_sent(&send), 0);
    exchange(a, b, &send, &recv, 262_145, seed + 7);
    let before = chunks_sent(&send);
    assert!(before > 0, "above 256 KiB a message is chunked");
    // Four at once: behind the first, the others stripe.
    let sizes = [150_001, 150_002, 65_537, 262_144];
    let mut flights = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut m = HostMemory::zeroed(n).unwrap();
        pattern(seed + 10 + i as u64, &mut m);
        let expect = m.to_vec();
        let src = a.reg_mr(m);
        let dst = b.reg_mr(HostMemory::zeroed(n).unwrap());
        let rx = recv
            .irecv(&[RecvBuf {
                mr: &dst,
                offset: 0,
                len: n,
                tag: i as i32,
            }])
            .unwrap()
            .unwrap();
        let tx = send.isend(&src, 0, n, i as i32).unwrap().unwrap();
        flights.push((tx, rx, src, dst, expect));
    }
    for (mut tx, mut rx, _src, mut dst, expect) in flights {
        tx.wait(T).unwrap();
        assert_eq!(rx.wait(T).unwrap()[0], expect.len() as u64);
        drop(rx);
        assert!(dst.bytes().unwrap() == &expect[..]);
    }
    assert!(
        chunks_sent(&send) >= before + 3,
        "messages behind a large one are chunked"
    );
}

#[test]
fn lone_mid_size_messages_travel_inline_with_every_engine() {
    for engine in [EngineKind::Epoll, EngineKind::Uring] {
        for zc in [ZeroCopy::Off, ZeroCopy::On] {
            let (a, b) = (net_with(engine, zc), net_with(engine, zc));
            std::thread::scope(|s| {
                s.spawn(|| lone_messages(&a, &b, 1));
                s.spawn(|| lone_messages(&b, &a, 2));
            });
        }
    }
}

#[test]
fn a_lone_message_stays_within_both_ends_inline_limit() {
    let limited = |max| {
        let mut c = three_nics();
        c.inline_idle_max = max;
        Net::init(c).unwrap()
    };
    let full = Net::init(three_nics()).unwrap();
    // (sender, receiver, largest inline); each limit is the announced KiB.
    for (a, b, largest) in [
        (&full, &limited(0), 65_536),
        (&limited(0), &full, 65_536),
        (&full, &limited(100_000), 97 * 1024),
        (&limited(128 << 10), &full, 128 << 10),
    ] {
        let (send, recv) = pair(a, b);
        exchange(a, b, &send, &recv, largest, 1);
        assert_eq!(chunks_sent(&send), 0, "{largest}");
        exchange(a, b, &send, &recv, largest + 1, 2);
        assert!(chunks_sent(&send) > 0, "{largest}");
    }
}

#[test]
fn truncated_receive_is_an_error_and_the_comm_survives() {
    let net = Net::init(three_nics()).unwrap();
    let (send, recv) = pair(&net, &net);
    for big in [100usize, 2_000_000] {
        let src = net.reg_mr(HostMemory::zeroed(big).unwrap());
        let dst = net.reg_mr(HostMemory::zeroed(big / 2).unwrap());
        let mut rx = recv
            .irecv(&[RecvBuf {
                mr: &dst,
                offset: 0,
                len: big / 2,
                tag: 1,
            }])
            .unwrap()
            .unwrap();
        let mut tx = send.isend(&src, 0, big, 1).unwrap().unwrap();
        let sent = tx.wait(T);
        if big > 65536 {
            // A chunked message is refused before any chunk leaves.
            assert!(matches!(sent, Err(Error::Truncated { .. })), "{sent:?}");
        } else {
            sent.unwrap();
        }
        match rx.wait(T) {
            Err(Error::Truncated {
                message,
                buffer,
                tag: 1,
            }) => {
                assert_eq!((message, buffer), (big as u64, big as u64 / 2))
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }
    // The next message still arrives intact.
    exchange(&net, &net, &send, &recv, 777_777, 9);
}

#[test]
fn grouped_receive_matches_by_tag() {
    let net = Net::init(three_nics()).unwrap();
    let (send, recv) = pair(&net, &net);
    let sizes = [10usize, 300_000, 0, 5];
    let srcs: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut m = HostMemory::zeroed(n).unwrap();
            pattern(i as u64 + 40, &mut m);
            m
        })
        .collect();
    let expect: Vec<Vec<u8>> = srcs.iter().map(|m| m.to_vec()).collect();
    let srcs: Vec<_> = srcs.into_iter().map(|m| net.reg_mr(m)).collect();
    let mut dsts: Vec<_> = (0..4)
        .map(|_| net.reg_mr(HostMemory::zeroed(400_000).unwrap()))
        .collect();
    // Buffers listed in a different order from the sends.
    let order = [3usize, 1, 0, 2];
    let bufs: Vec<_> = order
        .iter()
        .map(|&i| RecvBuf {
            mr: &dsts[i],
            offset: 0,
            len: 400_000,
            tag: 100 + i as i32,
        })
        .collect();
    let mut rx = recv.irecv(&bufs).unwrap().unwrap();
    drop(bufs);
    let mut txs: Vec<_> = (0..4)
        .map(|i| {
            send.isend(&srcs[i], 0, sizes[i], 100 + i as i32)
                .unwrap()
                .unwrap()
        })
        .collect();
    for t in &mut txs {
        t.wait(T).unwrap();
    }
    let got = rx.wait(T).unwrap();
    let want: Vec<u64> = order.iter().map(|&i| sizes[i] as u64).collect();
    assert_eq!(got.as_slice(), &want[..]);
    drop(rx);
    for (i, d) in dsts.iter_mut().enumerate() {
        assert!(
            d.bytes().unwrap()[..sizes[i]] == expect[i][..],
            "buffer {i}"
        );
    }
}

#[test]
fn request_slots_run_out_without_blocking() {
    let mut cfg = three_nics();
    cfg.max_requests = 8;
    let net = Net::init(cfg).unwrap();
    let (send, recv) = pair(&net, &net);
    let dst = net.reg_mr(HostMemory::zeroed(16).unwrap());
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(
            recv.irecv(&[RecvBuf {
                mr: &dst,
                offset: 0,
                len: 16,
                tag: 0,
            }])
            .unwrap()
            .expect("slot"),
        );
    }
    let t0 = std::time::Instant::now();
    assert!(recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 0,
            len: 16,
            tag: 0
        }])
        .unwrap()
        .is_none());
    assert!(t0.elapsed() < Duration::from_millis(100));
    // Completing one frees one slot.
    let src = net.reg_mr(HostMemory::zeroed(16).unwrap());
    send.isend(&src, 0, 16, 0)
        .unwrap()
        .unwrap()
        .wait(T)
        .unwrap();
    held[0].wait(T).unwrap();
    assert!(recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 0,
            len: 16,
            tag: 0
        }])
        .unwrap()
        .is_some());
}

#[test]
fn bad_arguments_are_typed_errors() {
    let net = Net::init(Config::loopback(&["127.0.0.1"]).unwrap()).unwrap();
    assert!(matches!(
        net.listen(5),
        Err(Error::NoSuchDevice { dev: 5, count: 1 })
    ));
    let (send, recv) = pair(&net, &net);
    let mr = net.reg_mr(HostMemory::zeroed(10).unwrap());
    assert!(matches!(
        send.isend(&mr, 5, 6, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(recv.irecv(&[]), Err(Error::InvalidArgument(_))));
    let nine: Vec<_> = (0..9)
        .map(|_| RecvBuf {
            mr: &mr,
            offset: 0,
            len: 1,
            tag: 0,
        })
        .collect();
    assert!(matches!(recv.irecv(&nine), Err(Error::InvalidArgument(_))));
}
