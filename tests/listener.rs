//! The listener under hostile input: floods of idle connections below the
//! half-open cap, above it and above the process's fd limit, and accept(2)
//! failing for want of descriptors. A legitimate peer must still connect.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::{from_hex, to_hex};
use common::T;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use socket2::{Domain, Socket, Type};
use tcpx::{Config, Handle, HostMemory, ListenComm, Net, RecvBuf, RecvComm};

const CHILD_ENV: &str = "TCPX_LISTENER_CHILD";
const NOFILE_ENV: &str = "TCPX_LISTENER_NOFILE";
/// Marks the child's own lines among the test harness output.
const MARK: &str = "TCPX-CHILD:";
/// The requirement: a peer connects within this long after a flood.
const AFTER_FLOOD: Duration = Duration::from_secs(1);
const MSG: usize = 4096;

fn one_nic() -> Config {
    Config::loopback(&["127.0.0.1"]).unwrap()
}

fn say(s: &str) {
    println!("{MARK}{s}");
    let _ = std::io::stdout().flush();
}

/// Runs in a child process (see `Listener::spawn`): a listener whose fd
/// limit is lowered, accepting until killed.
#[test]
fn child_entry() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let nofile: u64 = std::env::var(NOFILE_ENV).unwrap().parse().unwrap();
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, nofile, hard).unwrap();
    let net = Net::init(one_nic()).unwrap();
    let (h, mut l) = net.listen(0).unwrap();
    say(&format!("handle {}", to_hex(&h.to_bytes())));
    match mode.as_str() {
        "serve" => serve(&net, &mut l),
        "exhaust" => {
            // Every descriptor taken by something the listener cannot shed.
            let mut hog = Vec::new();
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hog.push(f);
            }
            let free = Arc::new(AtomicBool::new(false));
            let f = free.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = std::io::stdin().read_line(&mut line);
                f.store(true, Ordering::Release);
            });
            say("full");
            // accept(2) fails with EMFILE meanwhile: accept must not.
            while !free.load(Ordering::Acquire) {
                if let Err(e) = l.accept() {
                    say(&format!("accept failed: {e}"));
                    return;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            drop(hog);
            say("freed");
            serve(&net, &mut l);
        }
        m => panic!("unknown mode {m}"),
    }
}

/// Accepts comms and receives one message on each, forever.
fn serve(net: &Net, l: &mut ListenComm) {
    let mr = net.reg_mr(HostMemory::zeroed(MSG).unwrap());
    let mut comms = Vec::new();
    loop {
        let recv = l.accept_wait(Duration::from_secs(60)).unwrap();
        say("accepted");
        let mut r = recv
            .irecv(&[RecvBuf {
                mr: &mr,
                offset: 0,
                len: MSG,
                tag: 1,
            }])
            .unwrap()
            .unwrap();
        let n = r.wait(T).unwrap()[0];
        drop(r);
        say(&format!("received {n}"));
        comms.push(recv);
    }
}

/// A child listener; killed when dropped.
struct Listener {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<(Instant, String)>,
    handle: Option<Handle>,
}

impl Listener {
    fn spawn(mode: &str, nofile: u64) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mode)
            .env(NOFILE_ENV, nofile.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once(MARK) {
                    if tx.send((Instant::now(), rest.trim().to_string())).is_err() {
                        return;
                    }
                }
            }
        });
        let first = lines.recv_timeout(T);
        let mut l = Listener {
            child,
            stdin,
            lines,
            handle: None,
        };
        let (_, h) = first.unwrap_or_else(|e| panic!("no handle from the child: {e}"));
        let hex = h.strip_prefix("handle ").expect("the handle first");
        l.handle = Some(Handle::from_bytes(&from_hex(hex)).unwrap());
        l
    }

    fn handle(&self) -> Handle {
        self.handle.clone().expect("set at spawn")
    }

    /// The child's next marked line, with when it arrived.
    fn line(&mut self, within: Duration) -> (Instant, String) {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("no line from the child within {within:?}: {e}"))
    }

    fn expect(&mut self, what: &str, within: Duration) -> Instant {
        let (at, l) = self.line(within);
        assert_eq!(l, what, "the child said something else");
        at
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Non-blocking connects that never send a byte.
fn flood(to: SocketAddr, n: usize) -> Vec<Socket> {
    (0..n)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            match s.connect(&to.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => panic!("flood connect: {e}"),
            }
            s
        })
        .collect()
}

/// Connects to the child and sends it one message; returns when the child
/// has accepted (its "accepted" line), after checking the message arrived.
fn connect_and_send(net: &Net, l: &mut Listener) -> Instant {
    let mut h = l.handle();
    let send = net.connect_wait(0, &mut h, T).unwrap();
    let accepted = l.expect("accepted", T);
    let src = net.reg_mr(HostMemory::zeroed(MSG).unwrap());
    send.isend(&src, 0, MSG, 1)
        .unwrap()
        .unwrap()
        .wait(T)
        .unwrap();
    l.expect(&format!("received {MSG}"), T);
    accepted
}

/// The test process holds a flood of sockets of its own.
fn raise_own_fd_limit(to: u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < to {
        setrlimit(Resource::RLIMIT_NOFILE, to.min(hard), hard).unwrap();
    }
}

#[test]
fn a_flood_of_twice_the_fd_limit_does_not_wedge_the_listener() {
    const NOFILE: u64 = 256;
    raise_own_fd_limit(4 * NOFILE);
    let mut l = Listener::spawn("serve", NOFILE);
    let net = Net::init(one_nic()).unwrap();

    let idle = flood(l.handle().addr(), 2 * NOFILE as usize);
    let flooded = Instant::now();
    let took = connect_and_send(&net, &mut l) - flooded;
    eprintln!("listener: a peer connected {took:?} after a flood of {} idle connections (fd limit {NOFILE})", idle.len());
    assert!(took < AFTER_FLOOD, "{took:?} after the flood");

    // The flood goes away: the next peer connects at once too.
    drop(idle);
    let gone = Instant::now();
    let took = connect_and_send(&net, &mut l) - gone;
    assert!(took < AFTER_FLOOD, "{took:?} after the flood closed");
}

#[test]
fn accept_outlives_descriptor_exhaustion_it_cannot_relieve() {
    let mut l = Listener::spawn("exhaust", 128);
    l.expect("full", T);
    let net = Net::init(one_nic()).unwrap();
    let mut h = l.handle();
    std::thread::scope(|s| {
        let c = s.spawn(|| net.connect_wait(0, &mut h, T));
        // The peer waits in the kernel's queue while the child's accept(2)
        // fails with EMFILE and its accept() keeps returning Ok(None).
        std::thread::sleep(Duration::from_millis(300));
        writeln!(l.stdin, "free").unwrap();
        let freed = l.expect("freed", T);
        let took = l.expect("accepted", T) - freed;
        eprintln!("listener: accepted {took:?} after descriptors were freed");
        assert!(took < AFTER_FLOOD, "{took:?} after descriptors were freed");
        let send = c.join().unwrap().unwrap();
        let src = net.reg_mr(HostMemory::zeroed(MSG).unwrap());
        send.isend(&src, 0, MSG, 1)
            .unwrap()
            .unwrap()
            .wait(T)
            .unwrap();
    });
    l.expect(&format!("received {MSG}"), T);
}

/// Accepts one comm in a thread while `f` runs; returns what both gave and
/// how long the accept took.
fn accept_during<R: Send>(
    l: &mut ListenComm,
    f: impl FnOnce() -> R + Send,
) -> (RecvComm, Duration, R) {
    std::thread::scope(|s| {
        let t0 = Instant::now();
        let acc = s.spawn(move || {
            let c = l.accept_wait(T).unwrap();
            (c, t0.elapsed())
        });
        let r = f();
        let (c, took) = acc.join().unwrap();
        (c, took, r)
    })
}

/// Whether the listener still holds the other end (no EOF, no reset).
fn held(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn a_flood_below_the_cap_is_held_and_a_peer_connects_during_it() {
    let net = Net::init(one_nic()).unwrap();
    let cap = net.config().max_half_open;
    let (h, mut l) = net.listen(0).unwrap();
    let peer = Net::init(one_nic()).unwrap();
    let mut hh = h.clone();
    let n = cap - 56;
    let (recv, took, (send, mut idle)) = accept_during(&mut l, || {
        let idle: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect(h.addr()).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50)); // all accepted, none has said hello
        (peer.connect_wait(0, &mut hh, T).unwrap(), idle)
    });
    eprintln!("listener: accept took {took:?} with {n} idle connections held (cap {cap})");
    common::exchange(&peer, &net, &send, &recv, MSG, 3);
    assert!(
        idle.iter_mut().all(held),
        "below the cap no connection may be dropped before its hello deadline"
    );
}

#[test]
fn at_the_cap_the_oldest_half_open_connection_goes_first() {
    let mut cfg = one_nic();
    cfg.max_half_open = 8;
    let net = Net::init(cfg).unwrap();
    let (h, mut l) = net.listen(0).unwrap();
    let mut idle: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(h.addr()).unwrap())
        .collect();
    for _ in 0..3 {
        assert!(l.accept().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    while held(&mut idle[3]) && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(5));
    }
    for (i, s) in idle.iter_mut().enumerate() {
        assert_eq!(held(s), i >= 4, "connection {i} of 12 with a cap of 8");
    }
    // A peer still gets in: it displaces the oldest idle ones.
    let peer = Net::init(one_nic()).unwrap();
    let mut hh = h.clone();
    let (recv, _, send) = accept_during(&mut l, || peer.connect_wait(0, &mut hh, T).unwrap());
    common::exchange(&peer, &net, &send, &recv, MSG, 4);
}
