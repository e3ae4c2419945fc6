//! The memory kinds a process without CUDA reports, on every machine: this
//! binary turns CUDA off (`TCPX_CUDA_DISABLE`) before anything probes it,
//! so it holds on GPU machines too. One test: the probe is process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use plugin_TCPX::{ffi, status, Engine, Error, Mem, Options};

#[test]
fn without_cuda_only_dram_is_reported_and_vram_is_refused_with_the_cause() {
    std::env::set_var(devmem::cuda::DISABLE_ENV, "1");
    assert_eq!(Mem::supported(), vec![Mem::Dram]);
    // The C API the shim's getSupportedMems reads.
    let mut kinds = [u32::MAX; 8];
    assert_eq!(ffi::tnx_supported_mems(kinds.as_mut_ptr(), kinds.len()), 1);
    assert_eq!(kinds[0], 0);
    // prepXfer: VRAM is refused locally, while a peer's VRAM stays reachable.
    assert_eq!(ffi::tnx_check_xfer_mems(1, 0), status::ERR_NOT_SUPPORTED);
    assert_eq!(ffi::tnx_check_xfer_mems(0, 1), status::SUCCESS);
    assert_eq!(ffi::tnx_check_xfer_mems(0, 4), status::ERR_NOT_SUPPORTED);

    let e = Engine::new("A", Options::parse([("nics", "127.0.0.1")]).unwrap()).unwrap();
    // SAFETY: refused before the (fake, aligned) address is touched.
    let err = unsafe { e.register(1 << 20, 4096, Mem::Vram) }.unwrap_err();
    assert!(matches!(err, Error::NoCuda(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("VRAM needs CUDA") && text.contains("TCPX_CUDA_DISABLE is set"),
        "{text}"
    );
    assert_eq!(err.status(), status::ERR_NOT_SUPPORTED);
    // DRAM still registers.
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf outlives the engine.
    unsafe { e.register(buf.as_mut_ptr() as u64, 4096, Mem::Dram) }.unwrap();
    drop(e);
}
