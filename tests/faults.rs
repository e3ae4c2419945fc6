//! Bad input and faults: every one ends in a typed error, quickly, and
//! leaves other comms working.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{child, exchange, pair, three_nics, T};
use tcpx::wire::{Hello, Role};
use tcpx::{Error, Handle, HostMemory, Net, RecvBuf};

const BIG: usize = 256 << 20;

/// Runs in a child process (see `child::spawn`): connects to or listens for the
/// parent and streams big messages until killed.
#[test]
fn child_entry() {
    let Some((role, arg)) = child::role() else {
        return;
    };
    let net = Net::init(three_nics()).unwrap();
    let mr = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
    match role.as_str() {
        "sender" => child::send_forever(&net, &arg.unwrap(), BIG),
        // Sends one small message and ends the process at once: no goodbye.
        "send-and-exit" => {
            let mut h = Handle::from_bytes(&child::from_hex(&arg.unwrap())).unwrap();
            let send = net.connect_wait(0, &mut h, T).unwrap();
            let mut m = HostMemory::zeroed(3000).unwrap();
            common::pattern(5, &mut m);
            let m = net.reg_mr(m);
            send.isend(&m, 0, 3000, 5)
                .unwrap()
                .unwrap()
                .wait(T)
                .unwrap();
            std::process::exit(0);
        }
        "receiver" => {
            let (h, mut l) = net.listen(0).unwrap();
            child::say(&child::to_hex(&h.to_bytes()));
            let recv = l.accept_wait(T).unwrap();
            // Take one message slowly, then stop reading: the sender's sockets fill up.
            let mut r = recv
                .irecv(&[RecvBuf {
                    mr: &mr,
                    offset: 0,
                    len: BIG,
                    tag: 0,
                }])
                .unwrap()
                .unwrap();
            let _ = r.wait(Duration::from_secs(3600));
            std::thread::sleep(Duration::from_secs(3600));
        }
        r => panic!("unknown role {r}"),
    }
}

fn spawn_child(role: &str, handle: Option<&Handle>) -> Child {
    let hex = handle.map(|h| child::to_hex(&h.to_bytes()));
    child::spawn("child_entry", role, hex.as_deref())
}

/// Polls until an error; panics on success or after 5 s.
fn expect_error_within_5s(r: &mut tcpx::Request) -> Error {
    let t0 = Instant::now();
    loop {
        match r.test() {
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(5));
                return e;
            }
            Ok(Some(s)) => panic!("request completed ({s:?}) instead of failing"),
            Ok(None) if t0.elapsed() > Duration::from_secs(5) => {
                panic!("no error within 5 s: hang")
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

#[test]
fn killed_sender_fails_the_receive_within_5s() {
    let net = Net::init(three_nics()).unwrap();
    let (h, mut l) = net.listen(0).unwrap();
    let mut child = spawn_child("sender", Some(&h));
    let recv = l.accept_wait(T).unwrap();
    assert_eq!(child::line(&mut child), "connected");
    let mr = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
    let mut r = recv
        .irecv(&[RecvBuf {
            mr: &mr,
            offset: 0,
            len: BIG,
            tag: 0,
        }])
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30)); // mid-message
    child.kill().unwrap();
    let _ = child.wait();
    let e = expect_error_within_5s(&mut r);
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
}

#[test]
fn killed_receiver_fails_the_send_within_5s() {
    let net = Net::init(three_nics()).unwrap();
    let mut child = spawn_child("receiver", None);
    let mut h = Handle::from_bytes(&child::from_hex(&child::line(&mut child))).unwrap();
    let send = net.connect_wait(0, &mut h, T).unwrap();
    let mr = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
    let mut first = send.isend(&mr, 0, BIG, 0).unwrap().unwrap();
    first.wait(T).unwrap();
    let mut r = send.isend(&mr, 0, BIG, 0).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    child.kill().unwrap();
    let _ = child.wait();
    let e = expect_error_within_5s(&mut r);
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
}

#[test]
fn wrong_secret_garbage_and_silence_are_dropped_without_disturbing_others() {
    let net = Net::init(three_nics()).unwrap();
    let (h, mut l) = net.listen(0).unwrap();
    let mut wrong = TcpStream::connect(h.addr()).unwrap();
    let hello = Hello {
        secret: [0x42; 16],
        comm_id: 0,
        role: Role::Control,
        n_data: 3,
        inline_threshold: 0,
        peer_timeout_ms: 0,
    };
    wrong.write_all(&hello.encode()).unwrap();
    let mut garbage = TcpStream::connect(h.addr()).unwrap();
    garbage.write_all(&[0xEE; 48]).unwrap();
    let mut truncated = TcpStream::connect(h.addr()).unwrap();
    truncated.write_all(&hello.encode()[..20]).unwrap();
    truncated.shutdown(std::net::Shutdown::Write).unwrap();
    let _silent = TcpStream::connect(h.addr()).unwrap();

    // A legitimate peer connects in the middle of all that.
    let mut good = h.clone();
    let send_net = Net::init(three_nics()).unwrap();
    let (send, recv) = std::thread::scope(|s| {
        let c = s.spawn(|| send_net.connect_wait(0, &mut good, T).unwrap());
        let r = l.accept_wait(T).unwrap();
        (c.join().unwrap(), r)
    });
    for s in [&mut wrong, &mut garbage] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 64];
        assert_eq!(
            s.read(&mut b).unwrap(),
            0,
            "the listener must close a refused connection"
        );
    }
    exchange(&send_net, &net, &send, &recv, 100_001, 3);
}

#[test]
fn garbage_handles_are_typed_errors() {
    assert!(matches!(
        Handle::from_bytes(&[0xAB; 128]),
        Err(Error::BadHandle(_))
    ));
    assert!(matches!(
        Handle::from_bytes(&[0u8; 64]),
        Err(Error::BadHandle(_))
    ));
    let net = Net::init(three_nics()).unwrap();
    let (h, _l) = net.listen(0).unwrap();
    let b = h.to_bytes();
    assert!(matches!(
        Handle::from_bytes(&b[..127]),
        Err(Error::BadHandle(_))
    ));
}

#[test]
fn close_with_requests_in_flight_fails_them_cleanly() {
    let net = Net::init(three_nics()).unwrap();
    // Receive side: posted, nothing sent.
    let (_send, recv) = pair(&net, &net);
    let dst = net.reg_mr(HostMemory::zeroed(16).unwrap());
    let mut r = recv
        .irecv(&[RecvBuf {
            mr: &dst,
            offset: 0,
            len: 16,
            tag: 0,
        }])
        .unwrap()
        .unwrap();
    drop(recv);
    assert!(matches!(expect_error_within_5s(&mut r), Error::Closed));
    // Send side: a large message nobody receives stalls in the socket buffers.
    let (send, _recv) = pair(&net, &net);
    let big = net.reg_mr(HostMemory::zeroed(64 << 20).unwrap());
    let mut s = send.isend(&big, 0, 64 << 20, 9).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(s.test().unwrap().is_none());
    drop(send);
    let e = expect_error_within_5s(&mut s);
    assert!(matches!(e, Error::Closed), "{e}");
}

#[test]
fn connect_to_a_closed_listener_fails_fast() {
    let net = Net::init(three_nics()).unwrap();
    let (h, l) = net.listen(0).unwrap();
    drop(l);
    let mut h = h;
    let t0 = Instant::now();
    let e = net.connect_wait(0, &mut h, T).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
    // The error names the address that refused, not 0.0.0.0.
    assert!(e.to_string().contains(&h.addr().to_string()), "{e}");
}

#[test]
fn a_version_1_peer_gets_a_clear_answer_both_ways() {
    let net = Net::init(three_nics()).unwrap();
    let (h, _l) = net.listen(0).unwrap();
    // A v1 handle: BadHandle that names the version.
    let mut b = h.to_bytes();
    b[4] = 1;
    let e = Handle::from_bytes(&b).unwrap_err().to_string();
    assert!(e.contains("wire version 1"), "{e}");
    // A v1 client's Hello (48 bytes, version byte 1): a Reject of version 2, then close.
    let mut secret = [0u8; 16];
    secret.copy_from_slice(&h.to_bytes()[8..24]);
    let mut v1 = Hello {
        secret,
        comm_id: 0,
        role: Role::Control,
        n_data: 3,
        inline_threshold: 0,
        peer_timeout_ms: 0,
    }
    .encode()[..48]
        .to_vec();
    v1[4] = 1;
    v1[6] = 48;
    let mut s = TcpStream::connect(h.addr()).unwrap();
    s.write_all(&v1).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut l2 = _l;
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut b = [0u8; 64];
    while t0.elapsed() < Duration::from_secs(5) {
        let _ = l2.accept();
        s.set_nonblocking(true).unwrap();
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let reject = tcpx::wire::Reject {
        reason: tcpx::wire::REJECT_VERSION,
    }
    .encode();
    assert_eq!(got, reject.to_vec(), "a Reject, then the listener closes");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refused at once, not after the hello deadline"
    );
}

#[test]
fn what_a_peer_sent_before_its_process_ended_is_still_received() {
    let net = Net::init(three_nics()).unwrap();
    let (h, mut l) = net.listen(0).unwrap();
    let mut kid = spawn_child("send-and-exit", Some(&h));
    let recv = l.accept_wait(T).unwrap();
    assert!(kid.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(600)); // ticks see the end meanwhile
    let mut dst = net.reg_mr(HostMemory::zeroed(3000).unwrap());
    let bufs = [RecvBuf {
        mr: &dst,
        offset: 0,
        len: 3000,
        tag: 5,
    }];
    let mut r = recv.irecv(&bufs).unwrap().unwrap();
    assert_eq!(r.wait(T).unwrap()[0], 3000);
    drop(r);
    let mut want = vec![0u8; 3000];
    common::pattern(5, &mut want);
    assert!(dst.bytes().unwrap() == &want[..]);
    // Then the end shows: a receive nothing can fill fails.
    let bufs = [RecvBuf {
        mr: &dst,
        offset: 0,
        len: 3000,
        tag: 5,
    }];
    let e = recv.irecv(&bufs).unwrap().unwrap().wait(T).unwrap_err();
    assert!(matches!(e, Error::ConnectionLost(_)), "{e}");
}
