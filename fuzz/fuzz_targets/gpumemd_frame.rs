//! Hostile bytes into the gpumemd frame parser and the pool metadata codec:
//! they must return errors, never panic, and what parses must re-encode to
//! a frame that parses to the same message.
#![no_main]

use devmem::gpumemd::{encode_frame, parse_frame, PoolMetadata};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, used)) = parse_frame(data) {
        assert!(used >= 2 && used <= data.len());
        // prost may re-encode differently (e.g. packed vs unpacked), but the
        // re-encoded frame must parse back to the same message.
        if let Ok(again) = encode_frame(&msg) {
            let (back, n) = parse_frame(&again).expect("re-encoded frame parses");
            assert_eq!(back, msg);
            assert_eq!(n, again.len());
        }
    }
    let _ = PoolMetadata::from_bytes(data);
});
