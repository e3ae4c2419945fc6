//! Hostile bytes into the netlink reply parser (what the kernel answers to
//! bind-rx / bind-tx / get-family): errors, never panics, and no more
//! messages or attribute bytes than the datagram holds. Seeds:
//! fuzz/seeds/netlink_reply (the golden bytes of devmem/src/netlink.rs's tests).
#![no_main]

use devmem::netlink::{parse_reply, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(replies) = parse_reply(data) {
        // Each message takes at least a 16-byte header.
        assert!(replies.len() * 16 <= data.len());
        let attr_bytes: usize = replies
            .iter()
            .map(|r| match r {
                Reply::Genl(attrs) => attrs.iter().map(|(_, p)| 4 + p.len()).sum(),
                _ => 0,
            })
            .sum();
        assert!(attr_bytes <= data.len());
    }
});
