//! Byte-exact streaming through the emulated devmem socket, the ABI parser
//! and the CPU unpack, for both kernel ABIs, with pools small enough that
//! back-pressure triggers; every token comes back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use devmem::emu::{EmuConfig, EmuDevmemSocket};
use devmem::gpumemd::mock::{MockConfig, MockGpumemd};
use devmem::pool::{RxPool, PAGE_SIZE};
use devmem::sockabi::{
    control_buffer_len, parse_rx, release_tokens, DevmemSocket, Fragment, KernelAbi,
};
use devmem::unpack::{plan, CpuUnpack, GatherPlan, Unpack};

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream's byte at `pos`: position-dependent, so a misplaced
/// fragment shows.
fn pat(pos: u64) -> u8 {
    (pos.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (pos >> 12) as u8
}

fn fill(buf: &mut [u8], pos: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pat(pos + i as u64);
    }
}

/// Sends `msgs` writes of random sizes in `1..=max_msg`; returns the total.
fn sender(mut s: TcpStream, msgs: usize, max_msg: usize, seed: u64) -> u64 {
    let mut rng = seed;
    let mut pos = 0u64;
    let mut buf = vec![0u8; max_msg];
    for _ in 0..msgs {
        let n = 1 + (splitmix(&mut rng) % max_msg as u64) as usize;
        fill(&mut buf[..n], pos);
        s.write_all(&buf[..n]).unwrap();
        pos += n as u64;
    }
    pos
}

#[derive(Debug, Default)]
struct Outcome {
    bytes: u64,
    frag_bytes: u64,
    tokens: u64,
    release_calls: usize,
    released: u64,
    stalls: u64,
    linear_frags: u64,
    unpack: Duration,
}

/// Receives the whole stream through `emu`, checking every byte.
fn receive(emu: &mut EmuDevmemSocket, seed: u64) -> Outcome {
    let abi = emu.config().abi;
    let dmabuf_id = emu.config().dmabuf_id;
    let mut rng = seed ^ 0xABCD;
    let mut out = Outcome::default();
    let mut held: Vec<u32> = Vec::new();
    let mut hold_limit = 1;
    let mut gp = GatherPlan::default();
    let mut dst = Vec::new();
    let mut want = Vec::new();
    loop {
        // Random read and control sizes per call, as callers vary (the
        // linear buffer is the iov: its length bounds the read).
        let mut linear = vec![0u8; 1 + (splitmix(&mut rng) % 65_536) as usize];
        let mut control = vec![0u8; control_buffer_len(1 + (splitmix(&mut rng) % 40) as usize)];
        let o = match emu.recv_devmem(&mut linear, &mut control) {
            Ok(o) => o,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(!held.is_empty(), "stalled with no tokens held");
                let r = release_tokens(emu, &held).unwrap();
                out.release_calls += r.calls;
                out.released += r.requested;
                held.clear();
                continue;
            }
            Err(e) => panic!("recv: {e}"),
        };
        if o.bytes == 0 {
            break;
        }
        let frags = parse_rx(abi, &control[..o.control_len], o.bytes, o.msg_flags).unwrap();
        let sum: u64 = frags.iter().map(|f| u64::from(f.len())).sum();
        assert_eq!(
            sum, o.bytes as u64,
            "fragment sizes add up to the byte count"
        );
        out.frag_bytes += sum;
        for f in &frags {
            match *f {
                Fragment::Pool {
                    offset,
                    len,
                    dmabuf_id: id,
                    ..
                } => {
                    assert!(len > 0);
                    assert!(
                        offset as usize % PAGE_SIZE + len as usize <= PAGE_SIZE,
                        "fragment {f:?} crosses a page"
                    );
                    let expect = (abi == KernelAbi::Upstream).then_some(dmabuf_id);
                    assert_eq!(id, expect);
                }
                Fragment::Linear { .. } => out.linear_frags += 1,
            }
        }
        gp.clear();
        dst.clear();
        dst.resize(o.bytes, 0);
        assert_eq!(
            plan(&frags, linear.len(), 0, o.bytes, &mut gp),
            Ok(o.bytes as u64)
        );
        let t = Instant::now();
        CpuUnpack
            .unpack(emu.pool().host().unwrap(), &mut dst, &gp.pool)
            .unwrap();
        CpuUnpack.unpack(&linear, &mut dst, &gp.linear).unwrap();
        out.unpack += t.elapsed();
        want.resize(o.bytes, 0);
        fill(&mut want, out.bytes);
        assert!(dst == want, "stream bytes differ at offset {}", out.bytes);
        out.bytes += o.bytes as u64;
        out.tokens += gp.tokens.len() as u64;
        held.extend_from_slice(&gp.tokens);
        if held.len() >= hold_limit {
            let r = release_tokens(emu, &held).unwrap();
            out.release_calls += r.calls;
            out.released += r.requested;
            held.clear();
            hold_limit = 1 + (splitmix(&mut rng) % 64) as usize;
        }
    }
    let r = release_tokens(emu, &held).unwrap();
    out.release_calls += r.calls;
    out.released += r.requested;
    out.stalls = emu.stats().stalls;
    out
}

fn connected() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn run(abi: KernelAbi, pool: RxPool, msgs: usize, max_msg: usize, seed: u64) -> Outcome {
    let pages = pool.pages().pages();
    let (tx, rx) = connected();
    let send = thread::spawn(move || sender(tx, msgs, max_msg, seed));
    let cfg = EmuConfig::new(abi).with_seed(seed);
    let mut emu = EmuDevmemSocket::new(rx, pool, cfg).unwrap();
    let out = receive(&mut emu, seed);
    let sent = send.join().unwrap();
    assert_eq!(out.bytes, sent);
    assert_eq!(out.frag_bytes, sent);
    let st = emu.stats();
    assert_eq!(st.bytes, sent);
    assert_eq!(st.pool_frags, out.tokens);
    assert_eq!(out.released, out.tokens, "every token given back once");
    assert_eq!(st.tokens_freed, out.tokens);
    assert_eq!(st.tokens_unknown, 0);
    assert!(emu.pool().outstanding().is_empty());
    assert_eq!(
        emu.pool().free_pages(),
        pages,
        "pool ends with every page free"
    );
    out
}

#[test]
fn byte_exact_both_abis_with_back_pressure() {
    for abi in KernelAbi::ALL {
        let pool = RxPool::local(8 * PAGE_SIZE).unwrap();
        let o = run(abi, pool, 1000, 20_000, 11);
        assert!(o.stalls > 0, "{abi:?}: an 8-page pool must stall");
        assert!(o.linear_frags > 0, "{abi:?}: some header bytes went linear");
    }
}

#[test]
fn pool_from_the_mock_gpumemd_memfd() {
    let cfg = MockConfig {
        pool_size: 16 * PAGE_SIZE as u64,
        ..MockConfig::default()
    };
    let pci = cfg.gpu_pci.clone();
    let d = MockGpumemd::start_temp(cfg).unwrap();
    let p = d.client(Duration::from_secs(5)).rx_pool(&pci).unwrap();
    for abi in KernelAbi::ALL {
        let pool = RxPool::map(p.fd.as_fd(), &p.metadata).unwrap();
        assert_eq!(pool.len(), 16 * PAGE_SIZE);
        let o = run(abi, pool, 300, 100_000, 5);
        assert!(o.stalls > 0);
    }
}

#[test]
fn soak_ten_thousand_messages() {
    let t = Instant::now();
    let mut total = 0;
    let mut unpack = Duration::ZERO;
    let (mut calls, mut tokens) = (0, 0);
    for (i, abi) in KernelAbi::ALL.into_iter().enumerate() {
        let pool = RxPool::local(64 * PAGE_SIZE).unwrap();
        let o = run(abi, pool, 10_000, 16_384, 100 + i as u64);
        total += o.bytes;
        unpack += o.unpack;
        calls += o.release_calls;
        tokens += o.tokens;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "soak: {} MB in {secs:.2} s; unpack {:.2} GB/s; {:.1} tokens per DONTNEED call",
        total / 1_000_000,
        total as f64 / unpack.as_secs_f64() / 1e9,
        tokens as f64 / calls as f64
    );
    assert!(secs < 30.0, "soak took {secs:.1} s");
}
