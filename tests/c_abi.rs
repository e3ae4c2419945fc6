//! The C ABI: the checked-in header matches the code, and a C program
//! compiled with the system `cc` moves bytes through it and tells
//! device-memory causes apart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use devmem::gpumemd::mock::{Endpoint, Fault, MockConfig, MockGpumemd};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn header_is_in_sync_with_the_code() {
    let cfg = cbindgen::Config::from_file(root().join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_config(cfg)
        .with_src(root().join("src/ffi.rs"))
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    let path = root().join("include/tcpx.h");
    if std::env::var_os("TCPX_BLESS").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == out,
        "include/tcpx.h is out of date: run `TCPX_BLESS=1 cargo test --test c_abi` and commit it"
    );
}

/// target/<profile>, where cargo puts libtcpx_capi.so.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Builds the C library (crate `tcpx-capi`) the C program links.
fn build_cdylib(dir: &Path) {
    let release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "tcpx-capi", "--quiet"])
        .current_dir(root());
    if release {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().expect("run cargo").success(),
        "cargo build -p tcpx-capi failed"
    );
    assert!(
        dir.join("libtcpx_capi.so").exists(),
        "libtcpx_capi.so not found in {}",
        dir.display()
    );
}

/// Compiles tests/c/transfer.c against the library and runs it with `args`.
fn run_c_program(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let dir = lib_dir();
    build_cdylib(&dir);
    let bin = std::env::temp_dir().join(format!("tcpx-c-{name}-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args([
            "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-pthread", "-I",
        ])
        .arg(root().join("include"))
        .arg(root().join("tests/c/transfer.c"))
        .arg("-o")
        .arg(&bin)
        .arg(format!("-L{}", dir.display()))
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-ltcpx_capi")
        .status()
        .expect("run the C compiler");
    assert!(st.success(), "cc failed");
    let mut cmd = Command::new(&bin);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_file(&bin);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

#[test]
fn c_program_transfers_through_the_header() {
    let (out, text) = run_c_program("transfer", &[], &[]);
    assert!(out.status.success(), "C program failed:\n{text}");
    assert!(text.contains("c-abi: ok"), "{text}");
}

#[test]
fn c_program_tells_an_absent_daemon_from_a_bad_pool_fd() {
    let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
    mock.set_fault(Fault::WrongFdKind, Some(Endpoint::GpuFd));
    let absent = std::env::temp_dir().join(format!("tcpx-c-no-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&absent).unwrap();
    let pci = MockConfig::default().gpu_pci;
    let (out, text) = run_c_program(
        "causes",
        &[
            "causes",
            absent.to_str().unwrap(),
            mock.prefix().to_str().unwrap(),
            &pci,
        ],
        // The emulated devmem NIC fetches gpumemd's pool at init.
        &[("TCPX_DEVMEM_EMULATED", "upstream")],
    );
    let _ = std::fs::remove_dir(&absent);
    assert!(out.status.success(), "C program failed:\n{text}");
    assert!(text.contains("c-abi causes: ok"), "{text}");
}
