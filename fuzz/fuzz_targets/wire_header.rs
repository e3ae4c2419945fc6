//! Hostile bytes into the peer wire parsers: errors, never panics; what
//! parses re-encodes to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcpx::wire::{parse_header, Header, Welcome, WELCOME_LEN};

fuzz_target!(|data: &[u8]| {
    match parse_header(data) {
        Ok(Header::Hello(h)) => assert_eq!(parse_header(&h.encode()).ok(), Some(Header::Hello(h))),
        Ok(Header::Msg(m)) => assert_eq!(parse_header(&m.encode()).ok(), Some(Header::Msg(m))),
        Ok(Header::Chunk(c)) => assert_eq!(parse_header(&c.encode()).ok(), Some(Header::Chunk(c))),
        Ok(Header::Welcome(_)) => {
            let _ = Welcome::decode_addrs(&data[WELCOME_LEN.min(data.len())..]);
        }
        Err(_) => {}
    }
});
