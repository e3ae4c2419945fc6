//! The transport's devmem receive path over the emulated devmem NIC (the
//! same seam and code above it as the kernel's devmem socket): payload
//! lands in an RX pool, fragments (and header-split linear bytes) are parsed
//! from kernel-exact control bytes, unpacked into the user's buffer, and
//! every token goes back exactly once — for both kernel ABIs, both
//! directions at once, many messages in flight, with released pages
//! poisoned so that a fragment read after its token went back would show.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::collections::VecDeque;

use common::{exchange, pair, pattern, three_nics, T};
use devmem::sockabi::abi::tcpx::UNPACK_MAX_SLICE_PAGES;
use devmem::sockabi::KernelAbi;
use tcpx::{DataPath, HostMemory, Net, RecvBuf, Stats};

fn net(abi: KernelAbi) -> Net {
    net_tx(abi, false)
}

/// With `tx`, host regions also leave by the emulated NIC's devmem TX.
fn net_tx(abi: KernelAbi, tx: bool) -> Net {
    let mut c = three_nics();
    c.devmem_emulated = Some(abi);
    c.emu_pool_bytes = 256 << 10; // small: the pool fills and drains many times
    c.emu_poison = true;
    c.emu_tx_host = tx;
    Net::init(c).unwrap()
}

/// Every devmem send was reported done through the error queue.
fn sends_completed(abi: KernelAbi, st: &Stats, payload: u64) {
    assert!(st.devmem_tx_sends > 0, "{abi:?}: {st:?}");
    assert!(st.devmem_tx_bytes >= payload, "{abi:?}: {payload}: {st:?}");
    assert_eq!(
        st.devmem_tx_completed, st.devmem_tx_sends,
        "{abi:?}: {st:?}"
    );
    assert_eq!(
        st.zerocopy_sends, 0,
        "{abi:?}: no host MSG_ZEROCOPY beside it: {st:?}"
    );
}

/// Every token lent came back once, none is held, none was returned twice
/// (caught by the ledger) or unknown to the NIC (upstream counts).
fn tokens_balanced(abi: KernelAbi, st: &Stats) {
    assert_eq!(
        st.devmem_tokens_received, st.devmem_fragments,
        "{abi:?}: {st:?}"
    );
    assert_eq!(
        st.devmem_tokens_returned, st.devmem_tokens_received,
        "{abi:?}: {st:?}"
    );
    assert_eq!(st.devmem_tokens_outstanding, 0, "{abi:?}: {st:?}");
    assert_eq!(st.devmem_token_double_returns, 0, "{abi:?}: {st:?}");
    assert_eq!(st.devmem_tokens_unfreed, 0, "{abi:?}: {st:?}");
}

fn sizes(seed: u64) -> Vec<usize> {
    common::odd_sizes(seed, 40, 64 << 20)
}

#[test]
fn both_abis_are_byte_exact_and_return_every_token() {
    for abi in [KernelAbi::Tcpx, KernelAbi::Upstream] {
        let (a, b) = (net(abi), net(abi));
        assert!(a
            .devices()
            .iter()
            .all(|d| d.path == DataPath::DevmemEmulated));
        std::thread::scope(|s| {
            s.spawn(|| {
                let (send, recv) = pair(&a, &b);
                for (i, n) in sizes(1).into_iter().enumerate() {
                    exchange(&a, &b, &send, &recv, n, 100 + i as u64);
                }
            });
            s.spawn(|| {
                let (send, recv) = pair(&b, &a);
                for (i, n) in sizes(2).into_iter().enumerate() {
                    exchange(&b, &a, &send, &recv, n, 900 + i as u64);
                }
            });
        });
        for st in [a.stats(), b.stats()] {
            assert!(st.devmem_fragments > 1000, "{abi:?}: {st:?}");
            tokens_balanced(abi, &st);
            assert!(
                st.devmem_linear_bytes > 0,
                "{abi:?}: header-split misses exercised: {st:?}"
            );
            assert!(
                st.devmem_dontneed_calls > 0
                    && st.devmem_dontneed_calls <= st.devmem_tokens_returned
            );
        }
    }
}

/// Issue-level integration: gpumemd (the mock) hands out the RX pool and
/// steers every data socket; the emulated devmem NIC receives into the
/// daemon's pool; both directions; rules gone after close.
#[test]
fn gpumemd_pool_and_flow_rules_with_the_emulated_nic() {
    use devmem::gpumemd::mock::{MockConfig, MockGpumemd};
    let mocks: Vec<MockGpumemd> = (0..2)
        .map(|_| {
            MockGpumemd::start_temp(MockConfig {
                pool_size: 4 << 20,
                ..MockConfig::default()
            })
            .unwrap()
        })
        .collect();
    let nets: Vec<Net> = mocks
        .iter()
        .map(|m| {
            let mut c = three_nics();
            c.gpumemd_prefix = Some(m.prefix().to_path_buf());
            c.gpu_pci = Some(MockConfig::default().gpu_pci);
            c.devmem = tcpx::DevmemMode::Require;
            c.devmem_emulated = Some(KernelAbi::Upstream);
            c.emu_pool_bytes = 256 << 10;
            Net::init(c).unwrap()
        })
        .collect();
    let (a, b) = (&nets[0], &nets[1]);
    assert!(a
        .devices()
        .iter()
        .all(|d| d.path == DataPath::DevmemEmulated));
    std::thread::scope(|s| {
        for (x, y, mock, seed) in [(a, b, &mocks[1], 3u64), (b, a, &mocks[0], 4)] {
            s.spawn(move || {
                let (send, recv) = pair(x, y);
                assert_eq!(
                    mock.installed_rules().len(),
                    recv.data_sockets(),
                    "one rule per data socket"
                );
                for (i, n) in sizes(seed).into_iter().enumerate() {
                    exchange(x, y, &send, &recv, n, seed * 1000 + i as u64);
                }
                drop(recv);
                assert!(
                    mock.installed_rules().is_empty(),
                    "rules withdrawn on close"
                );
            });
        }
    });
    for n in [a, b] {
        let st = n.stats();
        assert!(st.devmem_fragments > 1000, "{st:?}");
        assert_eq!(st.devmem_tokens_returned, st.devmem_fragments, "{st:?}");
    }
    // The pool parts come back with the sockets: 16 parts of 256 KiB, 6 per
    // receive comm, so three more connections only fit if closing frees them.
    for i in 0..3 {
        let (send, recv) = pair(a, b);
        exchange(a, b, &send, &recv, 5_000_001, 77 + i);
    }
}

/// Odd sizes, up to 8 receives and 8 sends in flight per direction, both
/// directions at once: every message byte-exact, every token back once.
#[test]
fn many_messages_in_flight_both_ways_with_poisoned_pages() {
    const WINDOW: usize = 8;
    let sizes: Vec<usize> = sizes(7)
        .into_iter()
        .chain((0..40).map(|i| 70_001 + i * 4097))
        .collect();
    let chunked: u64 = sizes
        .iter()
        .filter(|&&n| n > 65_536)
        .map(|&n| n as u64)
        .sum();
    for (abi, tx) in [
        (KernelAbi::Tcpx, false),
        (KernelAbi::Upstream, false),
        (KernelAbi::Tcpx, true),
        (KernelAbi::Upstream, true),
    ] {
        let (a, b) = (net_tx(abi, tx), net_tx(abi, tx));
        std::thread::scope(|s| {
            for (x, y, seed) in [(&a, &b, 10u64), (&b, &a, 20)] {
                let (send, recv) = pair(x, y);
                let sizes = &sizes;
                let send = s.spawn(move || {
                    let mut q = VecDeque::new();
                    for (i, &n) in sizes.iter().enumerate() {
                        if q.len() == WINDOW {
                            let (mut r, _m): (tcpx::Request, _) = q.pop_front().unwrap();
                            r.wait(T).unwrap();
                        }
                        let mut m = HostMemory::zeroed(n).unwrap();
                        pattern(seed + i as u64, &mut m);
                        let mr = x.reg_mr(m);
                        q.push_back((send.isend(&mr, 0, n, i as i32).unwrap().unwrap(), mr));
                    }
                    for (mut r, _) in q {
                        r.wait(T).unwrap();
                    }
                });
                s.spawn(move || {
                    let check = |i: usize, mut mr: tcpx::MemoryRegion, got: u64| {
                        assert_eq!(got, sizes[i] as u64, "{abi:?} message {i}");
                        let mut want = vec![0u8; sizes[i]];
                        pattern(seed + i as u64, &mut want);
                        assert!(
                            mr.bytes().unwrap()[..sizes[i]] == want[..],
                            "{abi:?} message {i}"
                        );
                    };
                    let mut q = VecDeque::new();
                    for (i, &n) in sizes.iter().enumerate() {
                        if q.len() == WINDOW {
                            let (j, mut r, mr): (usize, tcpx::Request, _) = q.pop_front().unwrap();
                            let got = r.wait(T).unwrap()[0];
                            drop(r);
                            check(j, mr, got);
                        }
                        let mr = y.reg_mr(HostMemory::zeroed(n + 3).unwrap());
                        let r = recv
                            .irecv(&[RecvBuf {
                                mr: &mr,
                                offset: 0,
                                len: n + 3,
                                tag: i as i32,
                            }])
                            .unwrap()
                            .unwrap();
                        q.push_back((i, r, mr));
                    }
                    for (j, mut r, mr) in q {
                        let got = r.wait(T).unwrap()[0];
                        drop(r);
                        check(j, mr, got);
                    }
                    send.join().unwrap();
                });
            }
        });
        for st in [a.stats(), b.stats()] {
            assert!(st.devmem_fragments > 1000, "{abi:?}: {st:?}");
            tokens_balanced(abi, &st);
            if tx {
                // Both ends send and receive: every chunk body left by devmem TX.
                sends_completed(abi, &st, chunked);
            } else {
                assert_eq!(st.devmem_tx_sends, 0, "{st:?}");
            }
        }
    }
}

/// The original exits the process when a receive has more fragments than
/// one unpack slice (2048); here one message of many times that arrives
/// whole, gathered batch by batch.
#[test]
fn a_message_of_many_unpack_slices_is_batched_not_fatal() {
    for abi in KernelAbi::ALL {
        let (a, b) = (net(abi), net(abi));
        let (send, recv) = pair(&a, &b);
        let before = b.stats().devmem_fragments;
        let n = 40 << 20;
        exchange(&a, &b, &send, &recv, n, 99);
        let st = b.stats();
        let frags = st.devmem_fragments - before;
        assert!(
            frags > 4 * UNPACK_MAX_SLICE_PAGES as u64,
            "{abi:?}: {frags} fragments in one message"
        );
        tokens_balanced(abi, &st);
    }
}
