//! The TCPX plugin's legacy RX-pool import, chosen with
//! `NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT=0` (google/nccl-plugin-gpudirecttcpx
//! `src/gpu/cuda_wrapper.cu` `gpu_rx_init_internal`, `src/gpu/rx_pool.cu`
//! `gpumem_import`): no daemon socket is asked; the file `/tmp/nvdma-<pci>`
//! (a fixed folder there) holds the pool's 64-byte `CUipcMemHandle`, opened
//! with `cuIpcOpenMemHandle(..., CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)`.
//!
//! Where the original differs from us: a missing file is an INFO "skip"
//! and the GPU gets no pool (retried on the next receive); a short read,
//! a read or close error, or a failing open exits the process. Here each is
//! a typed [`PoolError::LegacyHandle`] (or the CUDA error of the open) that
//! `TCPX_DEVMEM=prefer` turns into the host path and `require` into a
//! failed init. The handle carries no size: the allocation's is used.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::cuda::vmm::IPC_HANDLE_LEN;
use crate::pool::PoolError;

/// The original's folder for the handle file.
pub const LEGACY_DIR: &str = "/tmp";

/// `<dir>/nvdma-<pci>`.
pub fn legacy_path(dir: &Path, gpu_pci_addr: &str) -> PathBuf {
    dir.join(format!("nvdma-{gpu_pci_addr}"))
}

/// Reads the pool's IPC handle: exactly 64 bytes, as the original reads.
pub fn read_legacy_handle(
    dir: &Path,
    gpu_pci_addr: &str,
) -> Result<[u8; IPC_HANDLE_LEN], PoolError> {
    let path = legacy_path(dir, gpu_pci_addr);
    let bad = |reason: String| PoolError::LegacyHandle {
        path: path.clone(),
        reason,
    };
    let mut f = std::fs::File::open(&path).map_err(|e| {
        bad(format!(
            "{e}; the daemon that owns GPU {gpu_pci_addr}'s RX pool writes it (tcpgpudmarxd \
             serves it on a socket instead: set NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT=1)"
        ))
    })?;
    let mut handle = [0u8; IPC_HANDLE_LEN];
    let mut got = 0;
    while got < IPC_HANDLE_LEN {
        match f.read(&mut handle[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(format!("read: {e}"))),
        }
    }
    if got != IPC_HANDLE_LEN {
        return Err(bad(format!(
            "holds {got} bytes, a CUipcMemHandle is {IPC_HANDLE_LEN}"
        )));
    }
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_file_is_read_whole_or_refused_typed() {
        let dir = std::env::temp_dir().join(format!("nvdma-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pci = "0000:04:00.0";
        let missing = read_legacy_handle(&dir, pci).unwrap_err();
        assert!(
            matches!(&missing, PoolError::LegacyHandle { path, .. } if path.ends_with("nvdma-0000:04:00.0")),
            "{missing}"
        );
        std::fs::write(legacy_path(&dir, pci), [7u8; 10]).unwrap();
        let short = read_legacy_handle(&dir, pci).unwrap_err().to_string();
        assert!(short.contains("10 bytes"), "{short}");
        let h: Vec<u8> = (0..64).collect();
        std::fs::write(legacy_path(&dir, pci), &h).unwrap();
        assert_eq!(read_legacy_handle(&dir, pci).unwrap().to_vec(), h);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
