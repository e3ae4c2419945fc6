//! The engine without NIXL: two engines in one process over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::time::{Duration, Instant};

use plugin_TCPX::{Engine, Error, Mem, Op, Options, Progress, XferDesc, XferState};

fn engine_with(name: &str, progress: Progress) -> Engine {
    engine_packing(name, progress, false)
}

/// `pack_dram`: small DRAM descriptors travel packed too, as they do when
/// one side is VRAM (the only way to test packs without a GPU).
fn engine_packing(name: &str, progress: Progress, pack_dram: bool) -> Engine {
    let pack = if pack_dram { "1" } else { "0" };
    let mut opts = Options::parse([("nics", "127.0.0.1"), ("pack_dram", pack)]).unwrap();
    opts.progress = progress;
    Engine::new(name, opts).unwrap()
}

fn wait(x: &XferState) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !x.check()? {
        assert!(Instant::now() < deadline, "transfer hangs");
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

struct Setup {
    a: Engine,
    b: Engine,
    src: Vec<u8>,
    dst: Vec<u8>,
    a_md: u64,
    b_id: u64,
    b_md: u64,
}

fn setup(n: usize) -> Setup {
    setup_with(n, Progress::OnEvents)
}

fn setup_with(n: usize, progress: Progress) -> Setup {
    setup_packing(n, progress, false)
}

fn setup_packing(n: usize, progress: Progress, pack_dram: bool) -> Setup {
    let (a, b) = (
        engine_packing("A", progress, pack_dram),
        engine_packing("B", progress, pack_dram),
    );
    a.load_conn_info("B", &b.conn_info()).unwrap();
    b.load_conn_info("A", &a.conn_info()).unwrap();
    let mut src: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
    let mut dst = vec![0u8; n];
    // SAFETY: the buffers live in Setup, beside the engines, and are never
    // reallocated while registered.
    let (a_md, b_id) = unsafe {
        (
            a.register(src.as_mut_ptr() as u64, n as u64, Mem::Dram)
                .unwrap(),
            b.register(dst.as_mut_ptr() as u64, n as u64, Mem::Dram)
                .unwrap(),
        )
    };
    let b_md = a
        .load_remote_md("B", &b.public_data(b_id).unwrap(), Mem::Dram)
        .unwrap();
    Setup {
        a,
        b,
        src,
        dst,
        a_md,
        b_id,
        b_md,
    }
}

fn desc(s: &Setup, off: usize, len: usize) -> XferDesc {
    XferDesc {
        local_addr: s.src.as_ptr() as u64 + off as u64,
        remote_addr: s.dst.as_ptr() as u64 + off as u64,
        len: len as u64,
        local_md: s.a_md,
        remote_md: s.b_md,
    }
}

#[test]
fn write_then_read_back_is_byte_exact_and_notifies_once() {
    let mut s = setup(3 << 20);
    let descs: Vec<_> = (0..3).map(|i| desc(&s, i << 20, (1 << 20) - i)).collect();
    wait(&s.a.post(Op::Write, "B", &descs, Some(b"w")).unwrap()).unwrap();
    for d in &descs {
        let o = (d.remote_addr - s.dst.as_ptr() as u64) as usize;
        assert_eq!(s.dst[o..o + d.len as usize], s.src[o..o + d.len as usize]);
    }
    assert_eq!(s.b.take_notifs(), vec![("A".to_string(), b"w".to_vec())]);
    assert!(s.b.take_notifs().is_empty());
    s.src.fill(0);
    wait(&s.a.post(Op::Read, "B", &descs, None).unwrap()).unwrap();
    assert_eq!(s.src[..100], s.dst[..100]);
}

#[test]
fn a_prepared_transfer_posts_fresh_data_each_time_until_a_registration_goes() {
    let mut s = setup(1 << 20);
    // Every other 8 KiB block (none merge), prepared once.
    let descs: Vec<_> = (0..64).map(|i| desc(&s, 2 * i * 8192 + 3, 8191)).collect();
    let p = s.a.prepare(Op::Write, "B", descs.iter().copied()).unwrap();
    for round in 1..=3u8 {
        s.src.fill(round);
        wait(&s.a.post_prepared(&p, None).unwrap()).unwrap();
        for d in &descs {
            let o = (d.remote_addr - s.dst.as_ptr() as u64) as usize;
            assert!(
                s.dst[o..o + 8191].iter().all(|&b| b == round),
                "round {round}"
            );
        }
    }
    // A registration made meanwhile changes nothing; one that went is refused
    // at the next post, before anything is sent.
    let mut other = vec![0u8; 4096];
    // SAFETY: `other` outlives the registration, which is removed below.
    let id = unsafe { s.a.register(other.as_mut_ptr() as u64, 4096, Mem::Dram) }.unwrap();
    wait(&s.a.post_prepared(&p, None).unwrap()).unwrap();
    s.a.deregister(id).unwrap();
    wait(&s.a.post_prepared(&p, None).unwrap()).unwrap();
    s.a.deregister(s.a_md).unwrap();
    let e = s.a.post_prepared(&p, None).err();
    assert!(matches!(e, Some(Error::NotFound(_))), "{e:?}");
    let p = s.a.prepare(Op::Read, "B", descs.iter().copied());
    assert!(matches!(p, Err(Error::NotFound(_))));
}

#[test]
fn target_refuses_access_after_deregistration() {
    let s = setup(1 << 16);
    s.b.deregister(s.b_id).unwrap();
    for op in [Op::Write, Op::Read] {
        let e = wait(
            &s.a.post(op, "B", &[desc(&s, 0, 1 << 16)], Some(b"x"))
                .unwrap(),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Refused { .. }), "{e}");
        assert_eq!(e.status(), plugin_TCPX::status::ERR_NOT_ALLOWED);
    }
    assert!(
        s.dst.iter().all(|&b| b == 0),
        "refused WRITE touched memory"
    );
    assert!(s.b.take_notifs().is_empty());
}

#[test]
fn dropped_peer_fails_in_flight_transfers() {
    dropped_peer_fails_in_flight(Progress::OnEvents);
}

#[test]
fn dropped_peer_fails_in_flight_transfers_when_polled() {
    dropped_peer_fails_in_flight(Progress::Polling {
        delay: Duration::ZERO,
    });
}

fn dropped_peer_fails_in_flight(progress: Progress) {
    let s = setup_with(64 << 20, progress);
    let x =
        s.a.post(Op::Write, "B", &[desc(&s, 0, 64 << 20)], None)
            .unwrap();
    let Setup { a, b, .. } = s;
    drop(b);
    let start = Instant::now();
    // Done before the drop, or failed: never a hang.
    if let Err(e) = wait(&x) {
        assert!(matches!(e, Error::PeerLost { .. }), "{e}");
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(a);
}

#[test]
fn unknown_options_are_refused_with_the_list() {
    let e = Options::parse([("nic", "lo")]).unwrap_err();
    assert!(
        e.to_string()
            .contains("known options: nics, sockets_per_nic"),
        "{e}"
    );
    assert!(Options::parse([("timeout_ms", "x")]).is_err());
    assert!(Options::parse([("pack_dram", "maybe")]).is_err());
}

/// Random bytes from a seed (xorshift64).
fn random_bytes(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn many_descriptors_from_several_threads_both_ways_are_byte_exact() {
    many_descriptors_from_several_threads_both_ways(Progress::OnEvents);
}

#[test]
fn the_same_with_a_polling_progress_thread() {
    many_descriptors_from_several_threads_both_ways(Progress::Polling {
        delay: Duration::ZERO,
    });
}

#[test]
fn a_polling_progress_thread_serves_a_passive_target() {
    // B never polls: its progress thread alone answers the WRITE and the READ.
    let mut s = setup_with(
        1 << 20,
        Progress::Polling {
            delay: Duration::from_micros(50),
        },
    );
    let descs: Vec<_> = (0..5).map(|i| desc(&s, i * 200_000, 199_999 - i)).collect();
    wait(&s.a.post(Op::Write, "B", &descs, Some(b"p")).unwrap()).unwrap();
    for d in &descs {
        let o = (d.remote_addr - s.dst.as_ptr() as u64) as usize;
        let r = o..o + d.len as usize;
        assert!(s.dst[r.clone()] == s.src[r], "descriptor at {o} differs");
    }
    s.src.fill(0);
    wait(&s.a.post(Op::Read, "B", &descs, None).unwrap()).unwrap();
    let d = descs[4];
    let o = (d.remote_addr - s.dst.as_ptr() as u64) as usize;
    assert!(s.src[o..o + d.len as usize] == s.dst[o..o + d.len as usize]);
    assert_eq!(s.b.take_notifs(), vec![("A".to_string(), b"p".to_vec())]);
}

fn many_descriptors_from_several_threads_both_ways(progress: Progress) {
    // 4 threads per side, each posting WRITEs and READs of 41 odd-sized
    // descriptors above the inline size: far more sends in flight than the
    // transport's 32 request slots, so units queue behind busy slots and
    // must still never interleave.
    const THREADS: usize = 4;
    const DESCS: usize = 41;
    const LEN: usize = 70_001;
    const SPAN: usize = DESCS * LEN;
    let (a, b) = (engine_with("A", progress), engine_with("B", progress));
    a.load_conn_info("B", &b.conn_info()).unwrap();
    b.load_conn_info("A", &a.conn_info()).unwrap();
    let mut mem: Vec<Vec<u8>> = (0..4)
        .map(|i| random_bytes(SPAN * THREADS, 0x9E37 + i))
        .collect();
    let ids: Vec<u64> = mem
        .iter_mut()
        .enumerate()
        .map(|(i, m)| {
            let e = if i < 2 { &a } else { &b };
            // SAFETY: the buffers outlive the engines' use of them (joined below).
            unsafe { e.register(m.as_mut_ptr() as u64, m.len() as u64, Mem::Dram) }.unwrap()
        })
        .collect();
    // mem[0], mem[1]: A's source and sink; mem[2], mem[3]: B's.
    let on_b = |i: usize| {
        a.load_remote_md("B", &b.public_data(ids[i]).unwrap(), Mem::Dram)
            .unwrap()
    };
    let on_a = |i: usize| {
        b.load_remote_md("A", &a.public_data(ids[i]).unwrap(), Mem::Dram)
            .unwrap()
    };
    let (a_to_b_sink, a_from_b_src) = (on_b(3), on_b(2));
    let (b_to_a_sink, b_from_a_src) = (on_a(1), on_a(0));
    let addr: Vec<u64> = mem.iter().map(|m| m.as_ptr() as u64).collect();
    // (engine, peer, local source md/addr, remote sink md/addr, local sink, remote source)
    let sides = [
        (
            &a,
            "B",
            (ids[0], addr[0]),
            (a_to_b_sink, addr[3]),
            (ids[1], addr[1]),
            (a_from_b_src, addr[2]),
        ),
        (
            &b,
            "A",
            (ids[2], addr[2]),
            (b_to_a_sink, addr[1]),
            (ids[3], addr[3]),
            (b_from_a_src, addr[0]),
        ),
    ];
    std::thread::scope(|s| {
        for side in &sides {
            for t in 0..THREADS {
                s.spawn(move || {
                    let (e, peer, src, rsink, sink, rsrc) = *side;
                    let base = (t * SPAN) as u64;
                    let descs = |(lmd, laddr): (u64, u64), (rmd, raddr): (u64, u64)| {
                        (0..DESCS)
                            .map(|k| {
                                let off = base + (k * LEN) as u64;
                                XferDesc {
                                    local_addr: laddr + off,
                                    remote_addr: raddr + off,
                                    len: (LEN - k % 7) as u64,
                                    local_md: lmd,
                                    remote_md: rmd,
                                }
                            })
                            .collect::<Vec<_>>()
                    };
                    let w = e.post(Op::Write, peer, &descs(src, rsink), None).unwrap();
                    let r = e.post(Op::Read, peer, &descs(sink, rsrc), None).unwrap();
                    wait(&w).unwrap();
                    wait(&r).unwrap();
                });
            }
        }
    });
    drop((a, b));
    // A wrote mem[0] into mem[3] and read mem[2] into mem[1]; B the reverse.
    for (from, to) in [(0, 3), (2, 1), (2, 1), (0, 3)] {
        for t in 0..THREADS {
            for k in 0..DESCS {
                let off = t * SPAN + k * LEN;
                let len = LEN - k % 7;
                assert!(
                    mem[from][off..off + len] == mem[to][off..off + len],
                    "mem[{to}] differs from mem[{from}] at descriptor {k} of thread {t}"
                );
            }
        }
    }
}

#[test]
fn a_refused_many_descriptor_write_leaves_the_link_usable() {
    // Drained message by message, and drained as packs.
    for pack in [false, true] {
        refused_many_descriptor_write(pack);
    }
}

fn refused_many_descriptor_write(pack: bool) {
    let mut s = setup_packing(1 << 20, Progress::OnEvents, pack);
    let outside = XferDesc {
        remote_addr: s.dst.as_ptr() as u64 + (1 << 20) - 10,
        len: 11,
        ..desc(&s, 0, 11)
    };
    // 40 good descriptors and one that pokes past the registration: all refused.
    let mut bad: Vec<_> = (0..40).map(|i| desc(&s, i * 9000, 8999)).collect();
    bad.push(outside);
    let e = wait(&s.a.post(Op::Write, "B", &bad, Some(b"no")).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    assert!(
        s.dst.iter().all(|&b| b == 0),
        "refused WRITE touched memory"
    );
    // The drained payloads kept the stream in step: the next WRITE lands.
    let good: Vec<_> = (0..40).map(|i| desc(&s, i * 9000, 8999)).collect();
    wait(&s.a.post(Op::Write, "B", &good, Some(b"yes")).unwrap()).unwrap();
    for i in 0..40 {
        let r = i * 9000..i * 9000 + 8999;
        assert!(s.dst[r.clone()] == s.src[r], "descriptor {i} differs");
    }
    assert_eq!(s.b.take_notifs(), vec![("A".to_string(), b"yes".to_vec())]);
    s.src.fill(0);
}

/// `n` descriptors of 1..=`max_len` bytes at odd offsets on both sides,
/// none overlapping another's destination, in a shuffled order on the
/// remote side; every fourth follows its predecessor on both sides (so
/// adjacent ones merge). Returns (local offset, remote offset, length) and
/// the buffer length both sides need.
fn odd_descriptors(n: usize, max_len: usize, seed: u64) -> (Vec<(usize, usize, usize)>, usize) {
    let r = random_bytes(n * 16, seed);
    let word = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap()) as usize;
    let lens: Vec<usize> = (0..n).map(|i| 1 + word(2 * i) % max_len).collect();
    let gap = |i: usize| {
        if i % 4 == 3 {
            0
        } else {
            1 + word(2 * i + 1) % 61
        }
    };
    // Local: in order with odd gaps. Remote: the same runs, shuffled.
    let mut local = Vec::with_capacity(n);
    let mut at = 3;
    for (i, &len) in lens.iter().enumerate() {
        at += gap(i);
        local.push(at);
        at += len;
    }
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        if i % 4 != 3 {
            order.swap(i, word(2 * i + 1) % (i + 1));
        }
    }
    let mut remote = vec![0; n];
    let mut rat = 5;
    for &i in &order {
        rat += gap(i);
        remote[i] = rat;
        rat += lens[i];
    }
    let descs = (0..n).map(|i| (local[i], remote[i], lens[i])).collect();
    (descs, at.max(rat) + 64)
}

/// WRITE then READ of `odd_descriptors(n, max_len)`, each checked against a
/// model of the whole destination (stray bytes fail too); `pack`: small
/// descriptors travel packed.
fn round_trip(n: usize, max_len: usize, seed: u64, pack: bool) {
    round_trip_over(n, max_len, seed, pack, false)
}

/// `round_trip`; `several`: each side also registers half of its buffer
/// again, and the descriptors name whole-buffer and half registrations in
/// turn (runs of each, and changes between neighbours).
fn round_trip_over(n: usize, max_len: usize, seed: u64, pack: bool, several: bool) {
    let (layout, span) = odd_descriptors(n, max_len, seed);
    let mut s = setup_packing(span, Progress::OnEvents, pack);
    let half = span / 2;
    let (a_half, b_half) = if several {
        // SAFETY: both halves lie inside the Setup's buffers, which outlive
        // the engines' use of them.
        let (a_half, b_half) = unsafe {
            (
                s.a.register(s.src.as_mut_ptr() as u64, half as u64, Mem::Dram)
                    .unwrap(),
                s.b.register(
                    s.dst.as_mut_ptr() as u64 + half as u64,
                    (span - half) as u64,
                    Mem::Dram,
                )
                .unwrap(),
            )
        };
        let b_blob = s.b.public_data(b_half).unwrap();
        (a_half, s.a.load_remote_md("B", &b_blob, Mem::Dram).unwrap())
    } else {
        (s.a_md, s.b_md)
    };
    let descs: Vec<XferDesc> = layout
        .iter()
        .enumerate()
        .map(|(i, &(l, r, len))| XferDesc {
            local_addr: s.src.as_ptr() as u64 + l as u64,
            remote_addr: s.dst.as_ptr() as u64 + r as u64,
            len: len as u64,
            local_md: if l + len <= half && i % 7 < 4 {
                a_half
            } else {
                s.a_md
            },
            remote_md: if r >= half && i % 5 < 3 {
                b_half
            } else {
                s.b_md
            },
        })
        .collect();
    s.src.copy_from_slice(&random_bytes(span, seed ^ 0x55));
    s.dst.fill(0);
    let mut model = vec![0u8; span];
    for &(l, r, len) in &layout {
        model[r..r + len].copy_from_slice(&s.src[l..l + len]);
    }
    wait(&s.a.post(Op::Write, "B", &descs, Some(b"w")).unwrap()).unwrap();
    if let Some(i) = (0..span).find(|&i| s.dst[i] != model[i]) {
        panic!("WRITE of {n} descriptors up to {max_len} B: first wrong byte at {i}");
    }
    s.dst.copy_from_slice(&random_bytes(span, seed ^ 0xAA));
    s.src.fill(0);
    let mut model = vec![0u8; span];
    for &(l, r, len) in &layout {
        model[l..l + len].copy_from_slice(&s.dst[r..r + len]);
    }
    wait(&s.a.post(Op::Read, "B", &descs, Some(b"r")).unwrap()).unwrap();
    if let Some(i) = (0..span).find(|&i| s.src[i] != model[i]) {
        panic!("READ of {n} descriptors up to {max_len} B: first wrong byte at {i}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut notes = s.b.take_notifs();
    while notes.len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        notes.extend(s.b.take_notifs());
    }
    let want: Vec<_> = [b"w", b"r"]
        .iter()
        .map(|m| ("A".to_string(), m.to_vec()))
        .collect();
    assert_eq!(notes, want);
}

#[test]
fn many_odd_descriptors_land_byte_exact_both_ways_packed_or_not() {
    // 1 to 1024 descriptors per transfer, from 1 B to above the 64 KiB a
    // pack takes between DRAM and anything (so packs and lone descriptors
    // mix in one transfer); each inline and chunked alone, and packed.
    let cases = [
        (1, 70_000),
        (2, 100),
        (7, 5000),
        (64, 70_000),
        (333, 1),
        (1024, 9000),
        (1024, 70_000),
    ];
    for (seed, (n, max_len)) in cases.into_iter().enumerate() {
        for pack in [false, true] {
            round_trip(n, max_len, 0x1000 + seed as u64, pack);
        }
    }
}

#[test]
fn descriptors_over_several_registrations_land_byte_exact_both_ways() {
    // Each side resolves a registration once per run of descriptors that
    // share it, and the target tries the last one hit before searching:
    // descriptors switching between overlapping registrations on both
    // sides, 1 to 1024 per transfer, packed or not.
    for (seed, (n, max_len)) in [(1, 5000), (5, 70_000), (333, 3000), (1024, 9000)]
        .into_iter()
        .enumerate()
    {
        for pack in [false, true] {
            round_trip_over(n, max_len, 0x3000 + seed as u64, pack, true);
        }
    }
}

#[test]
fn a_transfer_larger_than_the_pack_buffers_runs_in_rounds() {
    // 1024 descriptors of up to 64 KiB (32 MiB): about 32 packs of 1 MiB
    // each way, against 8 pack buffers per direction per engine, so packs
    // wait for buffers that earlier packs free; and 9000 descriptors, more
    // than one Write carries (8192), so the transfer goes in two batches.
    round_trip(1024, 64 << 10, 0x2000, true);
    round_trip(9000, 3000, 0x2001, true);
    round_trip(9000, 3000, 0x2002, false);
}
