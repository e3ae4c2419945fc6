//! `tcpx-bench server` against bad clients: an idle one, one that closes at
//! once and one that sends 128 garbage bytes are each dropped with one log
//! line, and a real client completes its sweep meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tcpx-bench");
const SETUP: Duration = Duration::from_secs(5);

/// The server; killed when dropped.
struct Server {
    child: Child,
    lines: Receiver<String>,
    /// Lines read but not yet asked for.
    seen: Vec<String>,
}

impl Server {
    fn start() -> (Self, SocketAddr) {
        let mut child = Command::new(BIN)
            .args(["server", "127.0.0.1:0", "--nics", "127.0.0.1"])
            .arg("--setup-timeout-ms")
            .arg(SETUP.as_millis().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut s = Server {
            child,
            lines,
            seen: Vec::new(),
        };
        let first = s.line(Duration::from_secs(20));
        let addr = first
            .strip_prefix("tcpx-bench server: waiting on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .unwrap();
        (s, addr)
    }

    fn line(&mut self, within: Duration) -> String {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("no line from the server within {within:?}: {e}"))
    }

    /// The server's line about the client at `peer` (clients' lines come in
    /// any order: those about others are kept for later).
    fn about(&mut self, peer: SocketAddr, within: Duration) -> String {
        let mine = format!("client {peer}:");
        if let Some(i) = self.seen.iter().position(|l| l.starts_with(&mine)) {
            return self.seen.remove(i);
        }
        let t0 = Instant::now();
        loop {
            let l = self.line(within.saturating_sub(t0.elapsed()));
            if l.starts_with(&mine) {
                return l;
            }
            self.seen.push(l);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client's sweep to completion (bounded).
fn client(addr: SocketAddr) -> String {
    let mut c = Command::new(BIN)
        .args(["client", &addr.to_string(), "--nics", "127.0.0.1", "--json"])
        .args([
            "--min-size",
            "4K",
            "--max-size",
            "8K",
            "--bytes-per-size",
            "64K",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = c.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = c.kill();
            panic!("the client's sweep did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success(), "client failed: {out}");
    out
}

#[test]
fn bad_clients_are_dropped_and_a_real_client_is_served_meanwhile() {
    let (mut server, addr) = Server::start();
    let mut idle = TcpStream::connect(addr).unwrap();
    let idle_at = Instant::now();
    let closing = TcpStream::connect(addr).unwrap();
    let closing_peer = closing.local_addr().unwrap();
    drop(closing);
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(&[0xAB; 128]).unwrap();

    let out = client(addr);
    assert!(out.contains("\"results\""), "{out}");
    // The idle client still waits: it did not hold the real one up.
    idle.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let mut handle = [0u8; 128];
    idle.read_exact(&mut handle).unwrap(); // the server's handle, then silence
    assert!(
        idle_at.elapsed() < SETUP,
        "the sweep took longer than the setup timeout; the test cannot tell"
    );
    let l = server.about(closing_peer, SETUP);
    assert!(l.contains("dropped"), "{l}");
    let l = server.about(garbage.local_addr().unwrap(), SETUP);
    assert!(
        l.contains("dropped") && l.contains("bad listen handle"),
        "{l}"
    );

    // The idle one goes at its deadline, with one line.
    let l = server.about(idle.local_addr().unwrap(), SETUP * 2);
    assert!(
        l.contains("dropped") && l.contains("no handle within"),
        "{l}"
    );
    assert!(idle_at.elapsed() >= SETUP);
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(idle.read(&mut handle).unwrap(), 0, "the server closes it");

    // Still serving.
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server exited"
    );
    client(addr);
}
