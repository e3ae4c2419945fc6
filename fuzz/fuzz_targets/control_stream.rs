//! Hostile bytes into both ends of the control protocol, cut into reads
//! of any size: the state machines fail the comm or carry on, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tcpx::fuzzing::control_stream(data);
});
