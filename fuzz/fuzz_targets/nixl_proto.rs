//! Hostile bytes into the NIXL peer-message parser: it must return errors,
//! never panic, and what decodes must re-encode to a message that decodes
//! to the same value. Seeds: fuzz/seeds/nixl_proto (every message kind,
//! pinned by plugins/nixl/src/proto.rs's tests).
#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_TCPX::proto::{Msg, MAX_MSG};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Msg::decode(data) {
        let again = m.encode();
        assert!(again.len() <= MAX_MSG);
        assert_eq!(Msg::decode(&again).expect("re-encoded message decodes"), m);
    }
});
