//! `connect_bytes` (behind `tcpx_connect`) that its caller stops resuming
//! holds sockets only until the handshake deadline, the listener's close, or
//! the Net's drop. One test: it counts the process's descriptors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::time::{Duration, Instant};

use tcpx::{Config, Error, Net, HANDLE_SIZE};

const N: usize = 100;
const TIMEOUT: Duration = Duration::from_millis(500);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn cfg() -> Config {
    let mut c = Config::loopback(&["127.0.0.1"]).unwrap();
    c.handshake_timeout = TIMEOUT;
    c
}

/// Starts `N` connects to `handle` and abandons them; returns their buffers.
fn abandon(net: &Net, handle: &[u8; HANDLE_SIZE]) -> Vec<[u8; HANDLE_SIZE]> {
    (0..N)
        .map(|_| {
            let mut b = *handle;
            assert!(net.connect_bytes(0, &mut b).unwrap().is_none());
            b
        })
        .collect()
}

/// Waits until the descriptor count is `n` (sockets close as their owners go).
fn settles_at(n: usize, what: &str) {
    let t0 = Instant::now();
    while open_fds() != n {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: {} descriptors open, {n} expected",
            open_fds()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn abandoned_connects_close_at_their_deadline_the_listeners_close_and_the_nets_drop() {
    let listening = Net::init(cfg()).unwrap();
    let net = Net::init(cfg()).unwrap();

    // Expiry: resuming one after the deadline sweeps them all.
    let (h, l) = listening.listen(0).unwrap();
    let base = open_fds();
    let mut bufs = abandon(&net, &h.to_bytes());
    assert!(open_fds() >= base + N, "each connect holds its socket");
    std::thread::sleep(TIMEOUT + Duration::from_millis(100));
    let e = net.connect_bytes(0, &mut bufs[0]).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    settles_at(base, "after the deadline");
    let e = net.connect_bytes(0, &mut bufs[1]).unwrap_err();
    assert!(
        matches!(e, Error::Timeout { .. }),
        "the next caller learns why: {e}"
    );
    drop(l);

    // Closing the listener ends the connects into it, from any Net of the process.
    let base = open_fds();
    let (h, l) = listening.listen(0).unwrap();
    let mut bufs = abandon(&net, &h.to_bytes());
    drop(l);
    settles_at(base, "after closing the listener");
    let e = net.connect_bytes(0, &mut bufs[0]).unwrap_err();
    assert!(
        matches!(e, Error::ConnectionLost(ref m) if m.contains("listener was closed")),
        "{e}"
    );

    // Dropping the connecting Net (tcpx_finalize) closes them, listener alive.
    let (h, _l) = listening.listen(0).unwrap();
    let base = open_fds();
    let other = Net::init(cfg()).unwrap();
    abandon(&other, &h.to_bytes());
    drop(other);
    settles_at(base, "after dropping the Net");
}
