//! Hostile bytes into the 128-byte listen handle parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpx::Handle;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Handle::from_bytes(data) {
        let again = h.to_bytes();
        assert_eq!(Handle::from_bytes(&again).ok(), Some(h));
        // Only the caller-private stage word may differ from the input.
        assert_eq!(&again[..120], &data[..120]);
    }
});
