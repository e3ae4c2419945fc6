//! The transport's devmem receive path over the emulated devmem NIC: payload
//! lands in an RX pool, fragments (and header-split linear bytes) are parsed
//! from kernel-exact control bytes, unpacked into the user's buffer, and every
//! token goes back — for both kernel ABIs, both directions at once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use common::{exchange, pair, three_nics};
use devmem::sockabi::KernelAbi;
use tcpx::{DataPath, Net};

fn net(abi: KernelAbi) -> Net {
    let mut c = three_nics();
    c.devmem_emulated = Some(abi);
    c.emu_pool_bytes = 256 << 10; // small: the pool fills and drains many times
    Net::init(c).unwrap()
}

fn sizes(seed: u64) -> Vec<usize> {
    let mut x = seed;
    let mut v: Vec<usize> = (0..40)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % 3_000_000
        })
        .collect();
    v.extend([0, 1, 65_537, 4096 * 3 + 1, 64 << 20]);
    v
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
            assert_eq!(
                st.devmem_tokens_returned, st.devmem_fragments,
                "{abi:?}: every token back: {st:?}"
            );
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

/// gpumemd's pool fd is not a memory file, so it is GPU memory: where CUDA
/// cannot import it (no driver, or no GPU at that PCI address), init fails
/// with a typed error that says so, never a panic.
#[test]
fn a_gpu_pool_that_cannot_be_imported_is_a_typed_error() {
    use devmem::gpumemd::mock::{MockConfig, MockGpumemd};
    let not_a_file = std::fs::File::open("/dev/null").unwrap();
    let mock = MockGpumemd::start_temp_with_pool(
        MockConfig {
            pool_size: 4 << 20,
            ..MockConfig::default()
        },
        not_a_file.into(),
    )
    .unwrap();
    let mut c = three_nics();
    c.gpumemd_prefix = Some(mock.prefix().to_path_buf());
    c.gpu_pci = Some(MockConfig::default().gpu_pci);
    c.devmem = tcpx::DevmemMode::Require;
    c.devmem_emulated = Some(KernelAbi::Upstream);
    match Net::init(c) {
        Err(tcpx::Error::Unsupported(m)) => assert!(m.contains("GPU memory"), "{m}"),
        other => panic!("expected a typed refusal, got {:?}", other.map(|_| ())),
    }
}
