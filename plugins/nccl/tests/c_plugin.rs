//! NCCL's view of the plugin: a C program compiled with the system `cc`
//! dlopens the .so under NCCL's file name, checks the ncclNetPlugin_v8..v12
//! tables and moves host memory through each table's entries only.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>, where cargo builds this crate's cdylib for this run.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Builds the cdylib (a no-op when fresh) so the test never loads a stale one.
fn build_cdylib(dir: &Path) -> PathBuf {
    let release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--lib", "--quiet", "-p", "tcpx-nccl-net"])
        .current_dir(root());
    if release {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().expect("run cargo").success(),
        "cargo build --lib failed"
    );
    let so = dir.join("libnccl_net_tcpx.so");
    assert!(so.exists(), "{} not found", so.display());
    so
}

#[test]
fn nccl_loads_the_tables_and_moves_bytes_through_them() {
    let so = build_cdylib(&lib_dir());
    let tmp = std::env::temp_dir().join(format!("tcpx-nccl-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // The name NCCL_NET_PLUGIN=tcpx makes NCCL dlopen.
    let nccl_name = tmp.join("libnccl-net-tcpx.so");
    std::fs::copy(&so, &nccl_name).unwrap();
    let bin = tmp.join("net_plugin");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(root().join("tests"))
        .arg(root().join("tests/c/net_plugin.c"))
        .arg("-o")
        .arg(&bin)
        .arg("-ldl")
        .status()
        .expect("run the C compiler");
    assert!(st.success(), "cc failed");
    // Twice: as NCCL sees it by default, and with every call traced in GDR
    // mode (which this machine may lack CUDA for: the C side checks either).
    for env in [
        &[][..],
        &[("TCPX_NCCL_TRACE", "1"), ("TCPX_NCCL_GDR", "1")][..],
    ] {
        let out = Command::new(&bin)
            .arg(&nccl_name)
            .env("TCPX_NICS", "127.0.0.1,127.0.0.2")
            .env_remove("NCCL_SOCKET_IFNAME")
            .env_remove("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME")
            .env_remove("TCPX_NCCL_TRACE")
            .env_remove("TCPX_NCCL_GDR")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "C program failed ({env:?}):\n{text}");
        for v in ["v12", "v11", "v10", "v9", "v8"] {
            assert!(
                text.contains(&format!("nccl-plugin: {v} transfers")),
                "{text}"
            );
        }
        assert!(text.contains("nccl-plugin: ok"), "{text}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
