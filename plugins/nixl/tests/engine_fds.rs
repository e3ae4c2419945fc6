//! Dropped engines give back every socket and eventfd, in both progress
//! modes (a link and its peer's comm refer to each other; that must not
//! keep them alive). Alone in its binary: other tests' fds would blur the count.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::time::{Duration, Instant};

use plugin_TCPX::{Engine, Mem, Op, Options, Progress, XferDesc};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn engine(name: &str, progress: Progress) -> Engine {
    let mut opts = Options::parse([("nics", "127.0.0.1")]).unwrap();
    opts.progress = progress;
    Engine::new(name, opts).unwrap()
}

/// Two engines that wrote to each other, then dropped.
fn round(progress: Progress) {
    let (a, b) = (engine("A", progress), engine("B", progress));
    a.load_conn_info("B", &b.conn_info()).unwrap();
    b.load_conn_info("A", &a.conn_info()).unwrap();
    let mut bufs = [vec![1u8; 100_000], vec![2u8; 100_000]];
    let [ab, bb] = &mut bufs;
    // SAFETY: the buffers outlive the engines (dropped at the end of this scope first).
    let (ai, bi) = unsafe {
        (
            a.register(ab.as_mut_ptr() as u64, ab.len() as u64, Mem::Dram)
                .unwrap(),
            b.register(bb.as_mut_ptr() as u64, bb.len() as u64, Mem::Dram)
                .unwrap(),
        )
    };
    let b_on_a = a
        .load_remote_md("B", &b.public_data(bi).unwrap(), Mem::Dram)
        .unwrap();
    let a_on_b = b
        .load_remote_md("A", &a.public_data(ai).unwrap(), Mem::Dram)
        .unwrap();
    for (e, peer, local, lmd, remote, rmd) in [
        (&a, "B", ab.as_ptr() as u64, ai, bb.as_ptr() as u64, b_on_a),
        (&b, "A", bb.as_ptr() as u64, bi, ab.as_ptr() as u64, a_on_b),
    ] {
        let d = XferDesc {
            local_addr: local,
            remote_addr: remote,
            len: 1000,
            local_md: lmd,
            remote_md: rmd,
        };
        let x = e.post(Op::Write, peer, &[d], None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !x.check().unwrap() {
            assert!(Instant::now() < deadline, "transfer hangs");
        }
    }
    drop((a, b));
}

#[test]
fn dropped_engines_close_every_fd_in_both_progress_modes() {
    let modes = [
        Progress::OnEvents,
        Progress::Polling {
            delay: Duration::ZERO,
        },
    ];
    // Warm-up: process-wide state opened once (logging, CUDA probe) is not a leak.
    for m in modes {
        round(m);
    }
    let before = open_fds();
    for _ in 0..3 {
        for m in modes {
            round(m);
        }
    }
    assert_eq!(open_fds(), before, "fds leaked by dropped engines");
}
