//! `tcpx-bench tcp-pingpong`, the raw TCP latency baseline of
//! benches/latency.sh: every shape (one connection or one per direction,
//! spinning, peeking or blocking reads) completes and reports its
//! percentiles.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tcpx-bench");

fn pingpong(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["--json", "tcp-pingpong", "--size", "1000", "--iters", "300"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tcp-pingpong {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_shape_of_the_raw_ping_pong_reports_its_latency() {
    for (spin, peek) in [(false, false), (true, false), (true, true)] {
        for per_direction in [false, true] {
            let mut args = Vec::new();
            if spin {
                args.push("--spin");
            }
            if peek {
                args.push("--peek");
            }
            if per_direction {
                args.push("--socket-per-direction");
            }
            let r = pingpong(&args);
            assert_eq!(r["spin"], spin, "{r}");
            assert_eq!(r["peek"], peek, "{r}");
            assert_eq!(r["socket_per_direction"], per_direction, "{r}");
            assert_eq!(r["iters"], 300, "{r}");
            let (p50, p99) = (r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap());
            assert!(p50 > 0.0 && p99 >= p50, "{r}");
        }
    }
}

#[test]
fn the_cpu_per_round_trip_compares_tcpx_with_raw_tcp_of_its_shape() {
    let out = Command::new(BIN)
        .args([
            "--json",
            "cpu-per-round-trip",
            "--size",
            "100",
            "--iters",
            "200",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cpu-per-round-trip failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (raw, ours) = (
        r["raw_ns"].as_f64().unwrap(),
        r["tcpx_ns"].as_f64().unwrap(),
    );
    assert!(raw > 0.0 && ours > 0.0, "{r}");
    let ratio = r["ratio"].as_f64().unwrap();
    assert!((ratio - ours / raw).abs() < 1e-9, "{r}");
}

#[test]
fn peeking_needs_spinning_reads() {
    let out = Command::new(BIN)
        .args(["tcp-pingpong", "--peek"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--spin"));
}
