//! MSG_ZEROCOPY: every mode is byte-exact, a finished send's buffer may be
//! reused at once, ENOBUFS falls back per send, and `auto` stays off where
//! the kernel copies anyway: to a peer on this host from the start, and
//! elsewhere (a veth pair into another namespace) once the kernel said so.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::lab::{self, over, Lab};
use common::{exchange, pair, pattern, three_nics, T};
use tcpx::{HostMemory, Net, RecvBuf, ZeroCopy};

/// optmem_max is machine-wide: the test that shrinks it runs alone.
static SERIAL: Mutex<()> = Mutex::new(());

fn net(mode: ZeroCopy) -> Net {
    let mut c = three_nics();
    c.zerocopy = mode;
    c.min_zcopy_size = 4096;
    Net::init(c).unwrap()
}

fn roundtrip(a: &Net, b: &Net, sizes: &[usize], seed: u64) {
    let (send, recv) = pair(a, b);
    for (i, &n) in sizes.iter().enumerate() {
        exchange(a, b, &send, &recv, n, seed + i as u64);
    }
}

const SIZES: [usize; 6] = [70_001, 524_288, 524_289, 3_000_017, 8 << 20, 1];

#[test]
fn every_mode_is_byte_exact_in_both_directions() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for mode in [ZeroCopy::Off, ZeroCopy::On, ZeroCopy::Auto] {
        let (a, b) = (net(mode), net(mode));
        std::thread::scope(|s| {
            s.spawn(|| roundtrip(&a, &b, &SIZES, 10));
            s.spawn(|| roundtrip(&b, &a, &SIZES, 20));
        });
        let st = a.stats();
        match mode {
            // Loopback peers always get copies: `auto` does not try.
            ZeroCopy::Off | ZeroCopy::Auto => assert_eq!(st.zerocopy_sends, 0, "{mode:?}: {st:?}"),
            ZeroCopy::On => assert!(st.zerocopy_sends > 0, "{st:?}"),
        }
    }
}

#[test]
fn buffer_reused_right_after_done_does_not_change_what_was_sent() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_nics();
    c.zerocopy = ZeroCopy::On;
    c.min_zcopy_size = 4096;
    c.chunk_size = 64 << 10;
    let (a, b) = (Net::init(c.clone()).unwrap(), Net::init(c).unwrap());
    let (send, recv) = pair(&a, &b);
    let n = 6 * (64 << 10) - 11;
    let mut dst = b.reg_mr(HostMemory::zeroed(n).unwrap());
    let mut m = HostMemory::zeroed(n).unwrap();
    pattern(77, &mut m);
    let expect = m.to_vec();
    let mut src = a.reg_mr(m);
    for round in 0..20 {
        let mut rx = recv
            .irecv(&[RecvBuf {
                mr: &dst,
                offset: 0,
                len: n,
                tag: 3,
            }])
            .unwrap()
            .unwrap();
        let mut tx = send.isend(&src, 0, n, 3).unwrap().unwrap();
        tx.wait(T).unwrap();
        drop(tx);
        // Done means delivered: the bytes can change at once.
        let was = src.bytes().unwrap().to_vec();
        src.bytes_mut().unwrap().fill(0xEE ^ round as u8);
        rx.wait(T).unwrap();
        drop(rx);
        assert!(
            dst.bytes().unwrap() == &was[..],
            "round {round}: overwritten bytes reached the receiver"
        );
        if round == 0 {
            assert!(was == expect);
        }
    }
    assert!(a.stats().zerocopy_sends > 0);
}

/// Across namespaces, where the peer is not this host's own address, the
/// kernel copies too (veth hands the packet to another stack): `auto`
/// tries, is told, and moves each socket to plain sends; `on` never does.
/// Byte-exact either way.
#[test]
fn auto_mode_moves_copying_sockets_to_plain_sends() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = lab::unavailable(false) {
        eprintln!("skipped: {why}");
        return;
    }
    let lab = Lab::new(2).expect("namespaces");
    let patience = (Duration::from_secs(5), Duration::from_millis(500));
    for mode in [ZeroCopy::Auto, ZeroCopy::On] {
        let side = |rx| {
            let mut c = lab.config(rx, patience.0, patience.1);
            c.zerocopy = mode;
            c.min_zcopy_size = 4096;
            c
        };
        const N: usize = (8 << 20) + 13;
        let mut stats = None;
        over(
            &lab,
            side(true),
            side(false),
            |net, recv| {
                for seed in 0..3 {
                    let mut dst = net.reg_mr(HostMemory::zeroed(N).unwrap());
                    let bufs = [RecvBuf {
                        mr: &dst,
                        offset: 0,
                        len: N,
                        tag: 1,
                    }];
                    let mut r = recv.irecv(&bufs).unwrap().unwrap();
                    assert_eq!(r.wait(T).unwrap()[0], N as u64);
                    drop(r);
                    let mut want = vec![0u8; N];
                    pattern(seed, &mut want);
                    assert!(
                        dst.bytes_mut().unwrap() == &want[..],
                        "message {seed} differs"
                    );
                }
            },
            |net, send| {
                for seed in 0..3 {
                    let mut m = HostMemory::zeroed(N).unwrap();
                    pattern(seed, &mut m);
                    let src = net.reg_mr(m);
                    send.isend(&src, 0, N, 1).unwrap().unwrap().wait(T).unwrap();
                }
                stats = Some(net.stats());
            },
        );
        let st = stats.unwrap();
        assert!(st.zerocopy_sends > 0, "{mode:?} tries on veth: {st:?}");
        assert!(st.zerocopy_reported_copied > 0, "veth copies: {st:?}");
        match mode {
            ZeroCopy::Auto => assert!(st.sockets_switched_to_plain > 0, "{st:?}"),
            _ => assert_eq!(
                st.sockets_switched_to_plain, 0,
                "`on` never switches: {st:?}"
            ),
        }
    }
}

#[test]
fn enobufs_falls_back_to_copying_sends() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = "/proc/sys/net/core/optmem_max";
    let Ok(old) = std::fs::read_to_string(path) else {
        eprintln!("skipped: {path} unreadable");
        return;
    };
    if std::fs::write(path, "64").is_err() {
        eprintln!("skipped: cannot write {path} (needs root)");
        return;
    }
    let (a, b) = (net(ZeroCopy::On), net(ZeroCopy::On));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        roundtrip(&a, &b, &SIZES, 50)
    }));
    std::fs::write(path, old.trim()).unwrap();
    r.unwrap();
    let st = a.stats();
    assert!(st.zerocopy_enobufs_fallbacks > 0, "{st:?}");
}
