//! Liveness is the protocol's job, not the kernel's: a frozen peer
//! (SIGSTOP) fails the other end within the peer timeout plus a second; a
//! live peer that is late, or pauses for less than the timeout, never does.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{child, pair, pattern, three_nics, T};
use nix::sys::signal::Signal;
use tcpx::{Config, Error, Handle, HostMemory, Net, RecvBuf};

const TIMEOUT: Duration = Duration::from_secs(2);
const BIG: usize = 64 << 20;
/// Timing tests run one at a time: a loaded box delays heartbeats.
static SERIAL: Mutex<()> = Mutex::new(());

fn config() -> Config {
    let mut c = three_nics();
    c.peer_timeout = Some(TIMEOUT);
    c
}

fn sizes(n: usize) -> Vec<usize> {
    let mut x = 0x1234_5678u64;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % (8 << 20)
        })
        .collect()
}

/// Runs in a child process (see `child::spawn`).
#[test]
fn child_entry() {
    let Some((role, arg)) = child::role() else {
        return;
    };
    let net = Net::init(config()).unwrap();
    match role.as_str() {
        // Sends big messages until stopped or killed.
        "sender" => child::send_forever(&net, &arg.unwrap(), BIG),
        // Receives big messages until stopped or killed.
        "receiver" => {
            let mr = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
            let (h, mut l) = net.listen(0).unwrap();
            child::say(&child::to_hex(&h.to_bytes()));
            let recv = l.accept_wait(T).unwrap();
            loop {
                let bufs = [RecvBuf {
                    mr: &mr,
                    offset: 0,
                    len: BIG,
                    tag: 0,
                }];
                let mut r = recv.irecv(&bufs).unwrap().unwrap();
                if r.wait(Duration::from_secs(3600)).is_err() {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
        // Receives `sizes(n)` and checks every byte; says how it went.
        "checker" => {
            let n: usize = arg.unwrap().parse().unwrap();
            let (h, mut l) = net.listen(0).unwrap();
            child::say(&child::to_hex(&h.to_bytes()));
            let recv = l.accept_wait(T).unwrap();
            let mut dst = net.reg_mr(HostMemory::zeroed(8 << 20).unwrap());
            for (i, len) in sizes(n).into_iter().enumerate() {
                let bufs = [RecvBuf {
                    mr: &dst,
                    offset: 0,
                    len,
                    tag: i as i32,
                }];
                let mut r = recv.irecv(&bufs).unwrap().unwrap();
                match r.wait(Duration::from_secs(60)) {
                    Ok(s) if s[0] == len as u64 => {}
                    other => {
                        child::say(&format!("message {i}: {other:?}"));
                        return;
                    }
                }
                drop(r);
                let mut want = vec![0u8; len];
                pattern(i as u64, &mut want);
                if dst.bytes().unwrap()[..len] != want[..] {
                    child::say(&format!("message {i} differs"));
                    return;
                }
            }
            child::say("ok");
        }
        r => panic!("unknown role {r}"),
    }
}

/// Kills the child however the test ends.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn expect_unresponsive(r: &mut tcpx::Request, since: Instant) -> Duration {
    let e = r.wait(Duration::from_secs(30)).unwrap_err();
    let after = since.elapsed();
    assert_eq!(
        e,
        Error::PeerUnresponsive { after_ms: 2000 },
        "after {after:?}"
    );
    assert!(
        after <= TIMEOUT + Duration::from_secs(1),
        "detected after {after:?}"
    );
    assert!(after >= TIMEOUT / 2, "a false alarm after {after:?}");
    after
}

#[test]
fn a_stopped_sender_fails_the_receiver_within_the_timeout() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::init(config()).unwrap();
    let (h, mut l) = net.listen(0).unwrap();
    let hex = child::to_hex(&h.to_bytes());
    let mut kid = Reaped(child::spawn("child_entry", "sender", Some(&hex)));
    let recv = l.accept_wait(T).unwrap();
    assert_eq!(child::line(&mut kid.0), "connected");
    let mr = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
    let bufs = [RecvBuf {
        mr: &mr,
        offset: 0,
        len: BIG,
        tag: 0,
    }];
    recv.irecv(&bufs).unwrap().unwrap().wait(T).unwrap();
    let mut r = recv.irecv(&bufs).unwrap().unwrap();
    // Mid-message: 64 MiB take over 10 ms here, and at 10 ms an idle box
    // had sometimes received them all before the stop.
    std::thread::sleep(Duration::from_millis(2));
    child::signal(&kid.0, Signal::SIGSTOP);
    let after = expect_unresponsive(&mut r, Instant::now());
    eprintln!("stopped sender detected after {after:?}");
}

#[test]
fn a_stopped_receiver_fails_the_sender_within_the_timeout() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::init(config()).unwrap();
    let mut kid = Reaped(child::spawn("child_entry", "receiver", None));
    let mut h = Handle::from_bytes(&child::from_hex(&child::line(&mut kid.0))).unwrap();
    let send = net.connect_wait(0, &mut h, T).unwrap();
    let mr = net.reg_mr(HostMemory::zeroed(BIG).unwrap());
    send.isend(&mr, 0, BIG, 0)
        .unwrap()
        .unwrap()
        .wait(T)
        .unwrap();
    let mut r = send.isend(&mr, 0, BIG, 0).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(10));
    child::signal(&kid.0, Signal::SIGSTOP);
    let stopped = Instant::now();
    // The message in flight may have arrived before the stop took effect;
    // the next cannot (it is larger than the sockets' buffers).
    let mut next = send.isend(&mr, 0, BIG, 0).unwrap().unwrap();
    let after = expect_unresponsive(&mut next, stopped);
    eprintln!("stopped receiver detected after {after:?}");
    // Done once its data sockets let go of the buffer, moments after the comm failed.
    match r.wait(Duration::from_secs(5)) {
        Ok(_) | Err(Error::PeerUnresponsive { .. }) => {}
        other => panic!("the message sent before the stop: {other:?}"),
    }
    // The comm is failed for good, with the same error.
    assert_eq!(
        send.isend(&mr, 0, 10, 0).unwrap_err(),
        Error::PeerUnresponsive { after_ms: 2000 }
    );
}

#[test]
fn a_receiver_that_pauses_below_the_timeout_is_never_killed() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let n = 40;
    let net = Net::init(config()).unwrap();
    let mut kid = Reaped(child::spawn("child_entry", "checker", Some(&n.to_string())));
    let mut h = Handle::from_bytes(&child::from_hex(&child::line(&mut kid.0))).unwrap();
    let send = net.connect_wait(0, &mut h, T).unwrap();
    let pid = nix::unistd::Pid::from_raw(kid.0.id() as i32);
    let pauser = std::thread::spawn(move || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(300));
            let _ = nix::sys::signal::kill(pid, Signal::SIGSTOP);
            std::thread::sleep(Duration::from_millis(800));
            let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
        }
    });
    for (i, len) in sizes(n).into_iter().enumerate() {
        let mut m = HostMemory::zeroed(len).unwrap();
        pattern(i as u64, &mut m);
        let src = net.reg_mr(m);
        send.isend(&src, 0, len, i as i32)
            .unwrap()
            .unwrap()
            .wait(Duration::from_secs(60))
            .unwrap();
    }
    pauser.join().unwrap();
    assert_eq!(child::line(&mut kid.0), "ok");
}

#[test]
fn a_receiver_that_posts_30_s_late_completes_byte_exact() {
    // Finding 3: the sender's sockets must not sit at zero window for the
    // kernel to kill; heartbeats keep both ends alive meanwhile.
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (a, b) = (Net::init(config()).unwrap(), Net::init(config()).unwrap());
    let (send, recv) = pair(&a, &b);
    let lens = [BIG + 7, 100, 0, 5 << 20];
    let msgs = messages(&a, &lens, 50);
    let mut sends = send_all(&send, &msgs);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        for s in &mut sends {
            // Inline messages are done; the large ones wait, unharmed.
            if let Err(e) = s.test() {
                panic!("a send failed while the receiver was late: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut dsts = buffers(&b, &lens);
    let mut recvs = receive_all(&recv, &dsts);
    for (i, r) in recvs.iter_mut().enumerate() {
        assert_eq!(r.wait(T).unwrap()[0], lens[i] as u64);
    }
    drop(recvs);
    for s in &mut sends {
        s.wait(T).unwrap();
    }
    for (d, (_, want)) in dsts.iter_mut().zip(&msgs) {
        assert!(d.bytes().unwrap() == &want[..]);
    }
}

/// Registered messages of `lens` bytes (seeded from `seed`) and their bytes.
fn messages(net: &Net, lens: &[usize], seed: u64) -> Vec<(tcpx::MemoryRegion, Vec<u8>)> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut m = HostMemory::zeroed(n).unwrap();
            pattern(seed + i as u64, &mut m);
            let v = m.to_vec();
            (net.reg_mr(m), v)
        })
        .collect()
}

/// Message `i` goes with tag `i`.
fn send_all(send: &tcpx::SendComm, msgs: &[(tcpx::MemoryRegion, Vec<u8>)]) -> Vec<tcpx::Request> {
    msgs.iter()
        .enumerate()
        .map(|(i, (m, v))| send.isend(m, 0, v.len(), i as i32).unwrap().unwrap())
        .collect()
}

fn buffers(net: &Net, lens: &[usize]) -> Vec<tcpx::MemoryRegion> {
    lens.iter()
        .map(|&n| net.reg_mr(HostMemory::zeroed(n).unwrap()))
        .collect()
}

/// A receive of tag `i` into the whole of buffer `i`.
fn receive_all(recv: &tcpx::RecvComm, dsts: &[tcpx::MemoryRegion]) -> Vec<tcpx::Request> {
    dsts.iter()
        .enumerate()
        .map(|(i, d)| {
            let bufs = [RecvBuf {
                mr: d,
                offset: 0,
                len: d.len(),
                tag: i as i32,
            }];
            recv.irecv(&bufs).unwrap().unwrap()
        })
        .collect()
}

/// Requests in flight while neither application polls: the comms' workers
/// move the data and keep both ends alive, and nothing is declared dead.
#[test]
fn ends_that_post_and_then_do_not_poll_for_3x_the_timeout_complete_byte_exact() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (a, b) = (Net::init(config()).unwrap(), Net::init(config()).unwrap());
    let (send, recv) = pair(&a, &b);
    let lens = [BIG + 3, 4097, 0, 3 << 20];
    let msgs = messages(&a, &lens, 70);
    let mut dsts = buffers(&b, &lens);
    let mut recvs = receive_all(&recv, &dsts);
    let mut sends = send_all(&send, &msgs);
    std::thread::sleep(3 * TIMEOUT);
    // Polled at last: the workers moved the chunked messages meanwhile,
    // and inline ones wait in the control socket for this first test.
    for (i, r) in recvs.iter_mut().enumerate() {
        let done = r.test().unwrap();
        assert_eq!(done.map(|s| s[0]), Some(lens[i] as u64), "receive {i}");
    }
    for s in &mut sends {
        s.wait(T).unwrap();
    }
    drop(recvs);
    for (d, (_, want)) in dsts.iter_mut().zip(&msgs) {
        assert!(d.bytes().unwrap() == &want[..]);
    }
}
