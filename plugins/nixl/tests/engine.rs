//! The engine without NIXL: two engines in one process over loopback.

use std::time::{Duration, Instant};

use plugin_TCPX::{Engine, Error, Mem, Op, Options, XferDesc, XferState};

fn engine(name: &str) -> Engine {
    Engine::new(name, Options::parse([("nics", "127.0.0.1")]).unwrap()).unwrap()
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
    let (a, b) = (engine("A"), engine("B"));
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
    let s = setup(64 << 20);
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
}
