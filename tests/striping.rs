//! Striping over NICs of unequal speed and losing one: between two network
//! namespaces joined by one veth pair per data NIC (each its own /24, some
//! rate-limited with `tc tbf`) and a control pair, made by the test
//! (skipped, with the reason, where that is impossible: not root, no
//! `ip` or `tc`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::lab::{self, over, Lab};
use common::{child, pattern};
use tcpx::{
    Config, EngineKind, Error, Handle, HostMemory, MemoryRegion, Net, RecvBuf, RecvComm, SendComm,
    ZeroCopy,
};

const T: Duration = Duration::from_secs(30);

fn filled(net: &Net, n: usize, seed: u64) -> MemoryRegion {
    let mut m = HostMemory::zeroed(n).unwrap();
    pattern(seed, &mut m);
    net.reg_mr(m)
}

/// Receives `n` bytes (tag `tag`) and checks they are pattern `seed`.
fn receive_exact(net: &Net, recv: &RecvComm, n: usize, tag: i32, seed: u64) -> tcpx::Result<()> {
    let mut dst = net.reg_mr(HostMemory::zeroed(n).unwrap());
    let mut r = recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 0,
            len: n,
            tag,
        }])?
        .expect("slot");
    let got = r.wait(T)?;
    drop(r);
    assert_eq!(got[0], n as u64);
    let mut want = vec![0u8; n];
    pattern(seed, &mut want);
    assert!(dst.bytes().unwrap() == &want[..], "message {tag} differs");
    Ok(())
}

fn sent_bytes(net: &Net) -> Vec<u64> {
    net.nic_stats()
        .iter()
        .map(|n| n.counts.bytes_sent)
        .collect()
}

const MSG: usize = 16 << 20;
const MSGS: usize = 16;

/// Streams `MSGS` messages of `MSG` bytes across the lab's NICs, each
/// checked byte for byte; the bytes each sender NIC carried.
fn stream_and_count(lab: &Lab) -> Vec<u64> {
    let (tx, rx) = mpsc::channel();
    let peer = Duration::from_secs(5);
    let stall = Duration::from_millis(500);
    over(
        lab,
        lab.config(true, peer, stall),
        lab.config(false, peer, stall),
        |net, recv| {
            for i in 0..MSGS {
                receive_exact(net, &recv, MSG, i as i32, i as u64).unwrap();
            }
        },
        |net, send| {
            send_window(net, &send, MSGS, MSG);
            tx.send(sent_bytes(net)).unwrap();
        },
    );
    rx.recv().unwrap()
}

#[test]
fn a_slow_nic_carries_what_it_can_and_the_fast_one_the_rest() {
    if let Some(why) = lab::unavailable(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(2).expect("namespaces");
    lab.rate(1, 1000);
    let b = stream_and_count(&lab);
    eprintln!("bytes per NIC (fast, 1 Gbit/s): {b:?}");
    assert!(
        b[0] >= 3 * b[1],
        "the fast NIC carried {} of {}",
        b[0],
        b[0] + b[1]
    );
    assert!(b[1] > 0, "the slow NIC carried nothing");
}

#[test]
fn four_nics_of_speeds_4_2_1_1_carry_in_proportion() {
    if let Some(why) = lab::unavailable(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(4).expect("namespaces");
    for (i, mbit) in [1600, 800, 400, 400].into_iter().enumerate() {
        lab.rate_exact(i, mbit);
    }
    let b = stream_and_count(&lab);
    eprintln!("bytes per NIC (1600, 800, 400, 400 Mbit/s): {b:?}");
    assert!(b[0] > b[1] && b[1] > b[2].max(b[3]), "{b:?}");
    assert!(b[0] >= 2 * b[2].max(b[3]), "{b:?}");
}

/// Sends `n` messages of `size` bytes (pattern seed and tag = index), four in flight.
fn send_window(net: &Net, send: &SendComm, n: usize, size: usize) {
    let srcs: Vec<_> = (0..n).map(|i| filled(net, size, i as u64)).collect();
    let mut inflight = std::collections::VecDeque::new();
    for (i, src) in srcs.iter().enumerate() {
        if inflight.len() == 4 {
            let mut r: tcpx::Request = inflight.pop_front().unwrap();
            r.wait(T).unwrap();
        }
        inflight.push_back(send.isend(src, 0, size, i as i32).unwrap().unwrap());
    }
    for mut r in inflight {
        r.wait(T).unwrap();
    }
}

/// 1 GiB over two NICs limited to 2 Gbit/s each: 0.4 s before the cut,
/// then the rest (about 3.5 s) on the NIC that is left.
const BIG: usize = 1 << 30;

/// Two data NICs limited to exactly 2 Gbit/s each: a 1 GiB message takes
/// seconds, long enough to cut or kill something in the middle of it.
fn two_nics_at_2_gbit() -> Lab {
    let lab = Lab::new(2).expect("namespaces");
    lab.rate_exact(0, 2000);
    lab.rate_exact(1, 2000);
    lab
}

#[test]
fn a_nic_cut_in_the_middle_of_a_large_message_is_survived_byte_exact() {
    nic_cut_in_a_large_message(EngineKind::Epoll, ZeroCopy::Auto);
}

/// The other engine, and zero-copy sends whose pages the kernel may still
/// hold when their socket is taken out.
#[test]
fn a_nic_cut_is_survived_under_io_uring_with_zero_copy_sends() {
    nic_cut_in_a_large_message(EngineKind::Uring, ZeroCopy::On);
}

fn nic_cut_in_a_large_message(engine: EngineKind, zerocopy: ZeroCopy) {
    if let Some(why) = lab::unavailable(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = two_nics_at_2_gbit();
    let peer = Duration::from_secs(5);
    let stall = Duration::from_millis(500);
    let with = |mut c: Config| {
        c.engine = engine;
        c.zerocopy = zerocopy;
        c
    };
    let (tx, rx) = mpsc::channel();
    let recv_stats = over(
        &lab,
        with(lab.config(true, peer, stall)),
        with(lab.config(false, peer, stall)),
        |net, recv| {
            receive_exact(net, &recv, BIG, 1, 1).unwrap();
            for i in 0..3 {
                receive_exact(net, &recv, 8 << 20, 10 + i, 10 + i as u64).unwrap();
            }
            recv.socket_stats()
        },
        |net, send| {
            let src = filled(net, BIG, 1);
            let mut r = send.isend(&src, 0, BIG, 1).unwrap().unwrap();
            std::thread::sleep(Duration::from_millis(400));
            assert!(
                r.test().unwrap().is_none(),
                "done before the cut: too small a message"
            );
            lab.down(1);
            let t0 = Instant::now();
            r.wait(T).unwrap();
            eprintln!("the message completed {:?} after the cut", t0.elapsed());
            // The comm goes on with the NIC that is left.
            for i in 0..3 {
                let m = filled(net, 8 << 20, 10 + i as u64);
                send.isend(&m, 0, 8 << 20, 10 + i)
                    .unwrap()
                    .unwrap()
                    .wait(T)
                    .unwrap();
            }
            tx.send((send.socket_stats(), net.nic_stats())).unwrap();
        },
    );
    let (socks, nics) = rx.recv().unwrap();
    eprintln!("sender sockets: {socks:#?}\nsender NICs: {nics:#?}");
    let out: Vec<_> = socks.iter().filter(|s| s.nic == 1).collect();
    assert!(
        out.iter().all(|s| !s.live),
        "NIC 1's sockets were taken out"
    );
    assert!(
        out.iter()
            .map(|s| s.counts.stalls + s.counts.failures)
            .sum::<u64>()
            >= 2,
        "each counted a stall or a failure"
    );
    assert!(
        nics[0].counts.resent_chunks > 0,
        "chunks were re-sent on NIC 0"
    );
    assert!(recv_stats.iter().filter(|s| s.nic == 1).all(|s| !s.live));
}

#[test]
fn every_nic_down_is_a_typed_error_within_the_peer_timeout() {
    if let Some(why) = lab::unavailable(false) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(2).expect("namespaces");
    let peer = Duration::from_secs(3);
    let stall = Duration::from_millis(500);
    let (cut_tx, cut_rx) = mpsc::channel::<Instant>();
    let received = over(
        &lab,
        lab.config(true, peer, stall),
        lab.config(false, peer, stall),
        move |net, recv| {
            let r = receive_exact(net, &recv, BIG, 1, 1);
            let cut = cut_rx.recv().unwrap();
            (r, cut.elapsed())
        },
        |net, send| {
            let src = filled(net, BIG, 1);
            let mut r = send.isend(&src, 0, BIG, 1).unwrap().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            lab.down(0);
            lab.down(1);
            let cut = Instant::now();
            cut_tx.send(cut).unwrap();
            let res = r.wait(T);
            let after = cut.elapsed();
            eprintln!("sender: {res:?} {after:?} after the cut");
            assert!(matches!(res, Err(Error::AllPathsLost { .. })), "{res:?}");
            assert!(after < peer + Duration::from_secs(2), "{after:?}");
        },
    );
    eprintln!("receiver: {received:?}");
    assert!(
        matches!(received.0, Err(Error::AllPathsLost { .. })),
        "{:?}",
        received.0
    );
    assert!(
        received.1 < peer + Duration::from_secs(3),
        "{:?}",
        received.1
    );
}

/// A NIC going down and up every second for ten seconds, as the issue
/// asks, under a stream of 400 messages of random sizes (1 B to 4 MiB,
/// inline and chunked): every message arrives once, in order, byte-exact.
#[test]
fn a_flapping_nic_loses_and_duplicates_nothing() {
    if std::env::var("TCPX_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("TCPX_LOG"))
            .try_init();
    }
    if let Some(why) = lab::unavailable(false) {
        eprintln!("skipped: {why}");
        return;
    }
    // 25 ms apart: the stream spans the 10 s of flapping.
    const N: usize = 400;
    const MAX: usize = 4 << 20;
    let sizes: Vec<usize> = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..N)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Many small ones, some large ones.
                match x % 4 {
                    0 => 1 + (x >> 8) as usize % 1000,
                    1 => 1 + (x >> 8) as usize % (64 << 10),
                    _ => 1 + (x >> 8) as usize % MAX,
                }
            })
            .collect()
    };
    let lab = Lab::new(2).expect("namespaces");
    let peer = Duration::from_secs(5);
    let stall = Duration::from_millis(500);
    let mut rx_cfg = lab.config(true, peer, stall);
    rx_cfg.reconnect = Some(Duration::from_millis(200));
    let mut tx_cfg = lab.config(false, peer, stall);
    tx_cfg.reconnect = Some(Duration::from_millis(200));
    let expect = sizes.clone();
    let (tx, rx) = mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let (rx_ns, stop) = (lab.rx.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut cuts = 0;
            let t0 = Instant::now();
            // Down for a second, up for a second, for 10 s.
            while t0.elapsed() < Duration::from_secs(10)
                && !stop.load(std::sync::atomic::Ordering::SeqCst)
            {
                std::thread::sleep(Duration::from_millis(500));
                let set = |state: &str| {
                    std::process::Command::new("ip")
                        .args(["-n", &rx_ns, "link", "set", "d1", state])
                        .status()
                        .unwrap()
                };
                set("down");
                cuts += 1;
                std::thread::sleep(Duration::from_secs(1));
                set("up");
                std::thread::sleep(Duration::from_millis(500));
            }
            cuts
        })
    };
    let recv_stats = over(
        &lab,
        rx_cfg,
        tx_cfg,
        move |net, recv| {
            let mut dst: Vec<MemoryRegion> = (0..4)
                .map(|_| net.reg_mr(HostMemory::zeroed(MAX).unwrap()))
                .collect();
            let mut posted = std::collections::VecDeque::new();
            let mut next = 0;
            for (i, &n) in expect.iter().enumerate() {
                while posted.len() < 4 && next < N {
                    let b = RecvBuf {
                        mr: &dst[next % 4],
                        offset: 0,
                        len: MAX,
                        tag: next as i32,
                    };
                    posted.push_back(recv.irecv(&[b]).unwrap().unwrap());
                    next += 1;
                }
                let mut r: tcpx::Request = posted.pop_front().unwrap();
                let got = r.wait(T).unwrap();
                drop(r);
                assert_eq!(got[0], n as u64, "message {i}: size");
                let mut want = vec![0u8; n];
                pattern(i as u64, &mut want);
                assert!(
                    dst[i % 4].bytes().unwrap()[..n] == want[..],
                    "message {i} differs"
                );
            }
            recv.socket_stats()
        },
        |net, send| {
            let srcs: Vec<_> = (0..4)
                .map(|_| net.reg_mr(HostMemory::zeroed(MAX).unwrap()))
                .collect();
            let mut srcs: Vec<Option<MemoryRegion>> = srcs.into_iter().map(Some).collect();
            let mut inflight: std::collections::VecDeque<(usize, tcpx::Request)> =
                Default::default();
            let t0 = Instant::now();
            for (i, &n) in sizes.iter().enumerate() {
                if inflight.len() == 4 {
                    let (j, mut r) = inflight.pop_front().unwrap();
                    r.wait(T).unwrap();
                    drop(r);
                    let _ = j;
                }
                let slot = i % 4;
                let mr = srcs[slot].as_mut().unwrap();
                pattern(i as u64, &mut mr.bytes_mut().unwrap()[..n]);
                let r = send.isend(mr, 0, n, i as i32).unwrap().unwrap();
                inflight.push_back((i, r));
                // Spread the stream over the flapping.
                let due = t0 + Duration::from_millis(25 * i as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            for (_, mut r) in inflight {
                r.wait(T).unwrap();
            }
            tx.send((send.socket_stats(), net.nic_stats())).unwrap();
        },
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let cuts = flapper.join().unwrap();
    let (socks, nics) = rx.recv().unwrap();
    eprintln!("{cuts} cuts; sender sockets: {socks:#?}\nsender NICs: {nics:#?}\nreceiver sockets: {recv_stats:#?}");
    let flapped: Vec<_> = socks.iter().filter(|s| s.nic == 1).collect();
    assert!(cuts >= 4, "{cuts} cuts");
    assert!(
        flapped
            .iter()
            .map(|s| s.counts.stalls + s.counts.failures)
            .sum::<u64>()
            >= 1,
        "the flapping NIC's sockets were taken out"
    );
    assert!(
        flapped.iter().map(|s| s.counts.reconnects).sum::<u64>() >= 1,
        "and connected again"
    );
}

/// Two NICs at 2 Gbit/s carry a 1 GiB message; 300 ms in, both are cut
/// (no FIN or RST can pass: the data sockets stay open, silent, each
/// mid-chunk), then one end closes its comm; its Bye reaches the other
/// end on the control NIC. Neither end gives up on a silent peer (peer
/// timeout off): the other end's request must still end, with
/// `PeerClosed`, within about the stall timeout of the Bye (it waited
/// for ever before). `rx_goes`: the receiver is the end that goes.
fn gone_while_data_is_silent(rx_goes: bool) {
    let lab = two_nics_at_2_gbit();
    let stall = Duration::from_millis(500);
    // No heartbeats: a ping meeting the closed control socket's reset
    // would end the comm by chance.
    let mut rx_cfg = lab.config(true, T, stall);
    let mut tx_cfg = lab.config(false, T, stall);
    rx_cfg.peer_timeout = None;
    tx_cfg.peer_timeout = None;
    let (cut_tx, cut_rx) = mpsc::channel::<()>();
    // When the receiver's Bye left (to the sender), and the sender's (to the receiver).
    let (rx_bye, rx_bye_at) = mpsc::channel::<Instant>();
    let (tx_bye, tx_bye_at) = mpsc::channel::<Instant>();
    let (res, after) = over(
        &lab,
        rx_cfg,
        tx_cfg,
        move |net, recv| {
            let dst = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
            let b = RecvBuf {
                mr: &dst,
                offset: 0,
                len: BIG,
                tag: 1,
            };
            let mut r = recv.irecv(&[b]).unwrap().unwrap();
            if rx_goes {
                cut_rx.recv().unwrap();
                assert!(r.test().unwrap().is_none(), "done before the cut");
                drop(r);
                drop(recv);
                rx_bye.send(Instant::now()).unwrap();
                return (Ok(()), Duration::ZERO);
            }
            let res = r.wait(T).map(drop);
            (res, tx_bye_at.recv().unwrap().elapsed())
        },
        |net, send| {
            let src = filled(net, BIG, 1);
            let mut r = send.isend(&src, 0, BIG, 1).unwrap().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            lab.down(0);
            lab.down(1);
            if rx_goes {
                cut_tx.send(()).unwrap();
                let res = r.wait(T).map(drop);
                let after = rx_bye_at.recv().unwrap().elapsed();
                eprintln!("sender: {res:?}, {after:?} after the receiver's Bye");
                assert!(matches!(res, Err(Error::PeerClosed)), "{res:?}");
                assert!(after < 4 * stall, "{after:?}");
                return;
            }
            assert!(r.test().unwrap().is_none(), "done before the cut");
            drop(r);
            drop(send);
            tx_bye.send(Instant::now()).unwrap();
        },
    );
    if !rx_goes {
        eprintln!("receiver: {res:?}, {after:?} after the sender's Bye");
        assert!(matches!(res, Err(Error::PeerClosed)), "{res:?}");
        assert!(after < 4 * stall, "{after:?}");
    }
}

/// Runs in a child process (see `child::spawn`), in the lab's sending
/// namespace: connects to the handle in its argument and sends one 1 GiB
/// message over two NICs, until killed.
#[test]
fn child_entry() {
    let Some((role, arg)) = child::role() else {
        return;
    };
    assert_eq!(role, "silent_sender");
    let mut cfg = lab::config(2, false, T, KILL_STALL);
    cfg.peer_timeout = None;
    let net = Net::init(cfg).unwrap();
    let mut h = Handle::from_bytes(&child::from_hex(&arg.unwrap())).unwrap();
    let send = net.connect_wait(0, &mut h, T).unwrap();
    let src = filled(&net, BIG, 1);
    let mut r = send.isend(&src, 0, BIG, 1).unwrap().unwrap();
    child::say("sending");
    let _ = r.wait(Duration::from_secs(3600));
    std::thread::sleep(Duration::from_secs(3600));
}

const KILL_STALL: Duration = Duration::from_millis(500);

/// As `gone_while_data_is_silent`, but the sender dies (SIGKILL) instead
/// of closing its comm: no Bye, only its kernel's FIN on the control NIC.
#[test]
fn a_sender_killed_while_its_data_sockets_are_silent_fails_the_receive() {
    if let Some(why) = lab::unavailable(true) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = two_nics_at_2_gbit();
    let mut rx_cfg = lab.config(true, T, KILL_STALL);
    rx_cfg.peer_timeout = None;
    let ns = lab.rx.clone();
    let (res, after) = std::thread::scope(|s| {
        s.spawn(|| {
            Lab::enter(&ns);
            let net = Net::init(rx_cfg).unwrap();
            let (h, mut l) = net.listen(0).unwrap();
            let hex = child::to_hex(&h.to_bytes());
            // A child inherits the namespace of the thread that forks it.
            let txns = lab.tx.clone();
            let mut kid = std::thread::spawn(move || {
                Lab::enter(&txns);
                child::spawn("child_entry", "silent_sender", Some(&hex))
            })
            .join()
            .unwrap();
            let recv = l.accept_wait(T).unwrap();
            let dst = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
            let b = RecvBuf {
                mr: &dst,
                offset: 0,
                len: BIG,
                tag: 1,
            };
            let mut r = recv.irecv(&[b]).unwrap().unwrap();
            assert_eq!(child::line(&mut kid), "sending");
            std::thread::sleep(Duration::from_millis(300));
            lab.down(0);
            lab.down(1);
            assert!(r.test().unwrap().is_none(), "done before the cut");
            kid.kill().unwrap();
            let killed = Instant::now();
            let _ = kid.wait();
            let res = r.wait(T).map(drop);
            (res, killed.elapsed())
        })
        .join()
        .unwrap()
    });
    eprintln!("receiver: {res:?}, {after:?} after the sender was killed");
    // No Bye came: the control connection's end without one.
    assert!(matches!(res, Err(Error::ConnectionLost(_))), "{res:?}");
    assert!(after < 4 * KILL_STALL, "{after:?}");
}

#[test]
fn a_sender_gone_while_its_data_sockets_are_silent_fails_the_receive() {
    if let Some(why) = lab::unavailable(true) {
        eprintln!("skipped: {why}");
        return;
    }
    gone_while_data_is_silent(false);
}

#[test]
fn a_receiver_gone_while_a_chunk_is_half_sent_fails_the_send() {
    if let Some(why) = lab::unavailable(true) {
        eprintln!("skipped: {why}");
        return;
    }
    gone_while_data_is_silent(true);
}
