//! Hostile bytes into the peer wire parsers: errors, never panics; what
//! parses re-encodes to the same header (every kind of wire version 2).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpx::wire::{parse_header, Header, Welcome, WELCOME_LEN};

fuzz_target!(|data: &[u8]| {
    let _ = tcpx::wire::foreign_version(data);
    if let Ok(h) = parse_header(data) {
        assert_eq!(parse_header(&h.encode()).ok(), Some(h.clone()));
        if let Header::Welcome(_) = h {
            let _ = Welcome::decode_addrs(&data[WELCOME_LEN.min(data.len())..]);
        }
    }
});
