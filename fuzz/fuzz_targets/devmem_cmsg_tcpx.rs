//! Fuzz the Tcpx devmem RX cmsg parser: `[returned u32][msg_flags i32][control...]`.
#![no_main]

use devmem::sockabi::{fuzzing, KernelAbi};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::fuzz_rx(KernelAbi::Tcpx, data);
});
