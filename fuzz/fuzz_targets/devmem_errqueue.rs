//! Fuzz the zero-copy error-queue parser: the control bytes of `recvmsg(MSG_ERRQUEUE)`.
#![no_main]

use devmem::sockabi::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzzing::fuzz_errqueue(data);
});
