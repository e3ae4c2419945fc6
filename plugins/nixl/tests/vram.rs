//! VRAM through the engine (GPU machine): two engines in one process over
//! loopback move random bytes of odd sizes VRAM→VRAM, DRAM→VRAM and
//! VRAM→DRAM with WRITE and READ; every check reads the whole destination
//! back and compares it with a host model, so misplaced bytes fail too.
//! Without CUDA each test prints "skipping: <why>" and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::time::{Duration, Instant};

use devmem::cuda::mem::DeviceBuffer;
use plugin_TCPX::{Engine, Error, Mem, Op, Options, XferDesc, XferState};
use rand::{Rng, RngCore, SeedableRng};

/// Registrations start this far into their buffer: VRAM ones are then not
/// 4 KiB aligned, as NIXL users' tensors often are not.
const SKEW: usize = 100;

fn gpu() -> bool {
    match devmem::cuda::probe() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

fn engine(name: &str) -> Engine {
    Engine::new(name, Options::parse([("nics", "127.0.0.1")]).unwrap()).unwrap()
}

fn wait(x: &XferState) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !x.check()? {
        assert!(Instant::now() < deadline, "transfer hangs");
        std::thread::sleep(Duration::from_micros(50));
    }
    Ok(())
}

/// Host or device memory, written and read back by copies.
enum Buf {
    Host(Vec<u8>),
    Dev(DeviceBuffer),
}

impl Buf {
    fn new(kind: Mem, len: usize) -> Buf {
        match kind {
            Mem::Dram => Buf::Host(vec![0; len]),
            Mem::Vram => {
                let d = tcpx::cuda_alloc(0, len).unwrap();
                d.fill(0).unwrap();
                Buf::Dev(d)
            }
        }
    }

    fn addr(&self) -> u64 {
        match self {
            Buf::Host(v) => v.as_ptr() as u64,
            Buf::Dev(d) => d.ptr(),
        }
    }

    fn write(&mut self, off: usize, src: &[u8]) {
        match self {
            Buf::Host(v) => v[off..off + src.len()].copy_from_slice(src),
            Buf::Dev(d) => d.write(off, src).unwrap(),
        }
    }

    fn read_all(&self) -> Vec<u8> {
        match self {
            Buf::Host(v) => v.clone(),
            Buf::Dev(d) => {
                let mut out = vec![0; d.len()];
                d.read(0, &mut out).unwrap();
                out
            }
        }
    }
}

/// Initiator A with buffer `a`, target B with buffer `b`, both registered
/// from `SKEW` on, B's loaded into A.
struct Pair {
    a: Engine,
    b: Engine,
    abuf: Buf,
    bbuf: Buf,
    a_md: u64,
    b_md: u64,
}

fn pair(ka: Mem, kb: Mem, len: usize) -> Pair {
    let (a, b) = (engine("A"), engine("B"));
    a.load_conn_info("B", &b.conn_info()).unwrap();
    b.load_conn_info("A", &a.conn_info()).unwrap();
    let (abuf, bbuf) = (Buf::new(ka, len), Buf::new(kb, len));
    let n = (len - SKEW) as u64;
    // SAFETY: the buffers live in Pair beside the engines and are never
    // reallocated; the engines are dropped first (field order).
    let (a_md, b_id) = unsafe {
        (
            a.register(abuf.addr() + SKEW as u64, n, ka).unwrap(),
            b.register(bbuf.addr() + SKEW as u64, n, kb).unwrap(),
        )
    };
    let b_md = a
        .load_remote_md("B", &b.public_data(b_id).unwrap(), kb)
        .unwrap();
    Pair {
        a,
        b,
        abuf,
        bbuf,
        a_md,
        b_md,
    }
}

fn desc(p: &Pair, a_off: usize, b_off: usize, len: usize) -> XferDesc {
    XferDesc {
        local_addr: p.abuf.addr() + a_off as u64,
        remote_addr: p.bbuf.addr() + b_off as u64,
        len: len as u64,
        local_md: p.a_md,
        remote_md: p.b_md,
    }
}

const SIZES: [usize; 7] = [1, 7, 4095, 4097, 65537, (1 << 20) + 3, (8 << 20) + 5];

/// Moves every size in one transfer and checks the whole destination.
fn move_and_check(ka: Mem, kb: Mem, op: Op, seed: u64) {
    // Whole 2 MiB pages: cuMemAlloc then returns page-aligned memory, so the
    // 4 KiB below a skewed registration is part of the same allocation.
    let cap = (SKEW + SIZES.iter().map(|n| n + 64).sum::<usize>()).next_multiple_of(2 << 20);
    let mut p = pair(ka, kb, cap);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut src = vec![0u8; cap];
    rng.fill_bytes(&mut src);
    // Source side filled with random bytes, destination zero (both models).
    let mut model = vec![0u8; cap];
    let (mut descs, mut at_a, mut at_b) = (Vec::new(), SKEW, SKEW + 13);
    for &n in &SIZES {
        descs.push(desc(&p, at_a, at_b, n));
        let (from, to) = if op == Op::Write {
            (at_a, at_b)
        } else {
            (at_b, at_a)
        };
        model[to..to + n].copy_from_slice(&src[from..from + n]);
        at_a += n + rng.gen_range(1..64);
        at_b += n + rng.gen_range(1..64);
    }
    match op {
        Op::Write => p.abuf.write(0, &src),
        Op::Read => p.bbuf.write(0, &src),
    }
    wait(&p.a.post(op, "B", &descs, Some(b"n")).unwrap()).unwrap();
    let got = match op {
        Op::Write => p.bbuf.read_all(),
        Op::Read => p.abuf.read_all(),
    };
    let what = format!("{op:?} local {ka} / remote {kb}");
    if let Some(i) = (0..cap).find(|&i| got[i] != model[i]) {
        panic!("{what}: first wrong byte at {i}");
    }
    // The notification trails the data on the target (WRITE and READ alike).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut notes = p.b.take_notifs();
    while notes.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        notes = p.b.take_notifs();
    }
    assert_eq!(notes, vec![("A".to_string(), b"n".to_vec())], "{what}");
}

#[test]
fn vram_write_and_read_are_byte_exact_in_every_direction() {
    if !gpu() {
        return;
    }
    let cases = [
        (Mem::Vram, Mem::Vram),
        (Mem::Dram, Mem::Vram),
        (Mem::Vram, Mem::Dram),
    ];
    let mut seed = 1;
    for (ka, kb) in cases {
        for op in [Op::Write, Op::Read] {
            move_and_check(ka, kb, op, seed);
            seed += 1;
        }
    }
    eprintln!(
        "byte-exact: WRITE and READ VRAM->VRAM, DRAM->VRAM, VRAM->DRAM, {} sizes 1 B..8 MiB+5 per transfer",
        SIZES.len()
    );
}

#[test]
fn vram_accesses_must_match_a_vram_registration() {
    if !gpu() {
        return;
    }
    // B registers VRAM (b) and DRAM (spare); A aims each kind's descriptor
    // at the other kind's memory.
    let p = pair(Mem::Dram, Mem::Vram, 2 << 20);
    let mut spare = vec![0u8; 1 << 16];
    // SAFETY: spare outlives the engines' use: it is deregistered below
    // before it drops and the refused transfers never touch it.
    let s_id = unsafe { p.b.register(spare.as_mut_ptr() as u64, 1 << 16, Mem::Dram) }.unwrap();
    let s_md =
        p.a.load_remote_md("B", &p.b.public_data(s_id).unwrap(), Mem::Dram)
            .unwrap();
    let vram_at_dram = desc(&p, SKEW, 0, 4096);
    let vram_at_dram = XferDesc {
        remote_addr: spare.as_ptr() as u64,
        ..vram_at_dram
    };
    let dram_at_vram = XferDesc {
        remote_md: s_md,
        remote_addr: p.bbuf.addr() + SKEW as u64,
        ..vram_at_dram
    };
    for d in [vram_at_dram, dram_at_vram] {
        for op in [Op::Write, Op::Read] {
            let e = wait(&p.a.post(op, "B", &[d], None).unwrap()).unwrap_err();
            assert!(matches!(e, Error::Refused { .. }), "{e}");
        }
    }
    assert!(
        spare.iter().all(|&b| b == 0),
        "a refused WRITE touched DRAM"
    );
    assert!(
        p.bbuf.read_all().iter().all(|&b| b == 0),
        "a refused WRITE touched VRAM"
    );
    p.b.deregister(s_id).unwrap();
}

#[test]
fn vram_to_vram_throughput() {
    if !gpu() {
        return;
    }
    const N: usize = 64 << 20;
    const ITERS: usize = 8;
    let mut p = pair(Mem::Vram, Mem::Vram, N + SKEW);
    let mut src = vec![0u8; N + SKEW];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut src);
    p.abuf.write(0, &src);
    let d = [desc(&p, SKEW, SKEW, N)];
    let mut gbps = Vec::new();
    for op in [Op::Write, Op::Read] {
        wait(&p.a.post(op, "B", &d, None).unwrap()).unwrap();
        let t = Instant::now();
        for _ in 0..ITERS {
            wait(&p.a.post(op, "B", &d, None).unwrap()).unwrap();
        }
        gbps.push((N * ITERS) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    assert!(p.bbuf.read_all()[SKEW..] == src[SKEW..], "WRITE differs");
    assert!(p.abuf.read_all()[SKEW..] == src[SKEW..], "READ differs");
    eprintln!(
        "byte-exact VRAM->VRAM through the NIXL engine, 64 MiB x {ITERS}: WRITE {:.2} GB/s, READ {:.2} GB/s",
        gbps[0], gbps[1]
    );
}

/// `n` descriptors of 1..=`max_len` bytes at odd offsets of both buffers
/// (from `SKEW` on), none overlapping; the remote side in another order.
/// Returns (a offset, b offset, length) and the capacity both need.
fn odd_descriptors(n: usize, max_len: usize, seed: u64) -> (Vec<(usize, usize, usize)>, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lens: Vec<usize> = (0..n).map(|_| rng.gen_range(1..=max_len)).collect();
    let (mut a_at, mut out) = (SKEW + 3, Vec::with_capacity(n));
    for &len in &lens {
        a_at += rng.gen_range(0..64);
        out.push((a_at, 0, len));
        a_at += len;
    }
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let mut b_at = SKEW + 5;
    for &i in &order {
        b_at += rng.gen_range(0..64);
        out[i].1 = b_at;
        b_at += lens[i];
    }
    let cap = (a_at.max(b_at) + 64).next_multiple_of(2 << 20);
    (out, cap)
}

/// WRITE or READ of `odd_descriptors(n, max_len)` between kinds `ka`
/// (initiator) and `kb`, the whole destination checked against a model.
fn packed_move_and_check(ka: Mem, kb: Mem, op: Op, n: usize, max_len: usize, seed: u64) {
    let (layout, cap) = odd_descriptors(n, max_len, seed);
    let mut p = pair(ka, kb, cap);
    let mut src = vec![0u8; cap];
    rand::rngs::StdRng::seed_from_u64(seed ^ 0x77).fill_bytes(&mut src);
    let mut model = vec![0u8; cap];
    let descs: Vec<XferDesc> = layout
        .iter()
        .map(|&(a, b, len)| desc(&p, a, b, len))
        .collect();
    for &(a, b, len) in &layout {
        let (from, to) = if op == Op::Write { (a, b) } else { (b, a) };
        model[to..to + len].copy_from_slice(&src[from..from + len]);
    }
    match op {
        Op::Write => p.abuf.write(0, &src),
        Op::Read => p.bbuf.write(0, &src),
    }
    wait(&p.a.post(op, "B", &descs, None).unwrap()).unwrap();
    let got = match op {
        Op::Write => p.bbuf.read_all(),
        Op::Read => p.abuf.read_all(),
    };
    if let Some(i) = (0..cap).find(|&i| got[i] != model[i]) {
        panic!("{op:?} of {n} descriptors up to {max_len} B, local {ka} / remote {kb}: first wrong byte at {i}");
    }
}

#[test]
fn vram_many_odd_descriptors_travel_packed_every_way() {
    if !gpu() {
        return;
    }
    let cases = [
        (Mem::Vram, Mem::Vram),
        (Mem::Dram, Mem::Vram),
        (Mem::Vram, Mem::Dram),
    ];
    let mut seed = 100;
    for (ka, kb) in cases {
        for op in [Op::Write, Op::Read] {
            // A DRAM side packs up to 64 KiB: packs and lone descriptors mix.
            for (n, max_len) in [(1, 9000), (7, 70_000), (128, 8192), (1024, 70_000)] {
                packed_move_and_check(ka, kb, op, n, max_len, seed);
                seed += 1;
            }
        }
    }
    // Between GPUs up to 1 MiB is packed: 300 of up to 1 MiB + 1 (about 150 MiB).
    packed_move_and_check(Mem::Vram, Mem::Vram, Op::Write, 300, (1 << 20) + 1, seed);
    packed_move_and_check(Mem::Vram, Mem::Vram, Op::Read, 300, (1 << 20) + 1, seed + 1);
    eprintln!("byte-exact: packed descriptors (1..1024 per transfer, 1 B..1 MiB+1) WRITE and READ VRAM->VRAM, DRAM->VRAM, VRAM->DRAM");
}

#[test]
fn vram_transfer_larger_than_the_staging_runs_in_rounds() {
    if !gpu() {
        return;
    }
    // 1024 descriptors of up to 160 KiB (about 80 MiB): about 20 packs of
    // 4 MiB each way against 8 pack buffers per direction, and more bytes
    // than the transport's pinned staging (TCPX_STAGING_BYTES, 64 MiB).
    packed_move_and_check(Mem::Vram, Mem::Vram, Op::Write, 1024, 160 << 10, 500);
    packed_move_and_check(Mem::Vram, Mem::Vram, Op::Read, 1024, 160 << 10, 501);
    eprintln!("byte-exact: 1024 VRAM descriptors (~80 MiB) in rounds of packs, WRITE and READ");
}

#[test]
fn vram_descriptor_shapes_throughput() {
    if !gpu() {
        return;
    }
    // Blocks every other block of the buffers (not adjacent: they do not
    // merge); WRITE, VRAM->VRAM and DRAM->DRAM in the same run, alternated.
    const ITERS: usize = 20;
    let shapes = [
        (1usize, 1usize << 20),
        (128, 8 << 10),
        (256, 64 << 10),
        (1, 128 << 20),
        (128, 1 << 20),
    ];
    let mut pairs: Vec<Pair> = [Mem::Vram, Mem::Dram]
        .into_iter()
        .map(|k| pair(k, k, (256 << 20) + (2 << 20)))
        .collect();
    let mut src = vec![0u8; 256 << 20];
    rand::rngs::StdRng::seed_from_u64(3).fill_bytes(&mut src);
    for p in &mut pairs {
        p.abuf.write(SKEW, &src);
    }
    let mut us = std::collections::HashMap::new();
    for &(n, len) in &shapes {
        for (k, p) in pairs.iter().enumerate() {
            let stride = if n == 1 { len } else { 2 * len };
            let descs: Vec<_> = (0..n)
                .map(|i| desc(p, SKEW + i * stride, SKEW + i * stride, len))
                .collect();
            wait(&p.a.post(Op::Write, "B", &descs, None).unwrap()).unwrap();
            let t = Instant::now();
            for _ in 0..ITERS {
                wait(&p.a.post(Op::Write, "B", &descs, None).unwrap()).unwrap();
            }
            let per = t.elapsed().as_secs_f64() * 1e6 / ITERS as f64;
            us.insert((k, n, len), per);
        }
    }
    let got = pairs[0].bbuf.read_all();
    let (n, len) = (128, 1 << 20);
    for i in 0..n {
        let at = SKEW + 2 * i * len;
        assert!(
            got[at..at + len] == src[2 * i * len..(2 * i + 1) * len],
            "block {i} differs"
        );
    }
    let gbs = |k, n: usize, len: usize| (n * len) as f64 / us[&(k, n, len)] / 1e3;
    for &(n, len) in &shapes {
        eprintln!(
            "ROW nixl_engine_write_{n}x{}KiB | VRAM {:.2} GB/s ({:.0} us), DRAM {:.2} GB/s ({:.0} us): VRAM/DRAM {:.2}x",
            len >> 10,
            gbs(0, n, len),
            us[&(0, n, len)],
            gbs(1, n, len),
            us[&(1, n, len)],
            gbs(0, n, len) / gbs(1, n, len)
        );
    }
    for k in [0, 1] {
        let kind = ["VRAM", "DRAM"][k];
        eprintln!(
            "ROW nixl_engine_128x8KiB_vs_1x1MiB_{kind} | {:.2}x GB/s; {:.2} us per descriptor over one 1 MiB block",
            gbs(k, 128, 8 << 10) / gbs(k, 1, 1 << 20),
            (us[&(k, 128, 8 << 10)] - us[&(k, 1, 1 << 20)]) / 128.0
        );
        eprintln!(
            "ROW nixl_engine_128x1MiB_vs_1x128MiB_{kind} | {:.2}x GB/s; {:.2} us per descriptor",
            gbs(k, 128, 1 << 20) / gbs(k, 1, 128 << 20),
            (us[&(k, 128, 1 << 20)] - us[&(k, 1, 128 << 20)]) / 128.0
        );
    }
}
