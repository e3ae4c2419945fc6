//! Entry points for the fuzz targets (`fuzz/fuzz_targets/devmem_cmsg_*.rs`).
//!
//! These assert invariants on purpose: a panic here is a finding.
#![forbid(unsafe_code)]
#![allow(clippy::expect_used)]

use super::{
    batch_ranges, coalesce_tokens, encode_rx, encode_zerocopy, parse_errqueue, parse_rx,
    salvage_tokens, ErrRecord, Fragment, KernelAbi,
};

/// Feeds arbitrary bytes to the RX parser of `abi`.
///
/// Layout: `[returned: u32][msg_flags: i32][control...]`, host order; inputs
/// under 8 bytes are parsed as a control buffer with `returned = 0`.
/// Checks: no panic; on success the sizes add up and the builder reproduces
/// a buffer that parses to the same fragments; token salvage and batching
/// keep every token.
pub fn fuzz_rx(abi: KernelAbi, data: &[u8]) {
    let (returned, flags, control) = match data {
        [a, b, c, d, e, f, g, h, rest @ ..] => (
            u32::from_ne_bytes([*a, *b, *c, *d]) as usize,
            i32::from_ne_bytes([*e, *f, *g, *h]),
            rest,
        ),
        _ => (0, 0, data),
    };
    if let Ok(frags) = parse_rx(abi, control, returned, flags) {
        let sum: u64 = frags.iter().map(|f| u64::from(f.len())).sum();
        assert_eq!(sum, returned as u64);
        let mut again = Vec::new();
        encode_rx(abi, &frags, &mut again).expect("parsed fragments re-encode");
        let back = parse_rx(abi, &again, returned, 0).expect("re-encoded buffer parses");
        assert_eq!(back, frags);
        let tokens: Vec<u32> = frags.iter().filter_map(Fragment::token).collect();
        assert_eq!(salvage_tokens(abi, control), tokens);
    }
    let tokens = salvage_tokens(abi, control);
    let batches = batch_ranges(
        &coalesce_tokens(&tokens),
        abi.max_dontneed_ranges(),
        abi.max_dontneed_tokens(),
    );
    let total: u64 = batches.iter().flatten().map(|r| u64::from(r.count)).sum();
    assert_eq!(total, tokens.len() as u64);
}

/// Feeds arbitrary bytes to the error-queue parser. Checks: no panic; every
/// zero-copy record re-encodes to bytes that parse to the same record.
pub fn fuzz_errqueue(data: &[u8]) {
    let Ok(records) = parse_errqueue(data) else {
        return;
    };
    for r in records {
        if let ErrRecord::Zerocopy(z) = r {
            for v6 in [false, true] {
                let mut again = Vec::new();
                encode_zerocopy(z, v6, &mut again);
                let back = parse_errqueue(&again).expect("an encoded record parses");
                assert_eq!(back, [ErrRecord::Zerocopy(z)]);
            }
        }
    }
}
