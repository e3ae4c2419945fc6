//! `tcpx-bench tcp-pingpong`, the raw TCP latency baseline of
//! benches/latency.sh: every shape (one connection or one per direction,
//! spinning or blocking reads) completes and reports its percentiles.
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
    for spin in [false, true] {
        for per_direction in [false, true] {
            let mut args = Vec::new();
            if spin {
                args.push("--spin");
            }
            if per_direction {
                args.push("--socket-per-direction");
            }
            let r = pingpong(&args);
            assert_eq!(r["spin"], spin, "{r}");
            assert_eq!(r["socket_per_direction"], per_direction, "{r}");
            assert_eq!(r["iters"], 300, "{r}");
            let (p50, p99) = (r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap());
            assert!(p50 > 0.0 && p99 >= p50, "{r}");
        }
    }
}
