//! Property tests of the devmem cmsg parsers and builders, both ABIs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use devmem::sockabi::{
    batch_ranges, coalesce_tokens, encode_rx, fuzzing, parse_rx, salvage_tokens, AbiError,
    Fragment, KernelAbi,
};
use proptest::prelude::*;

fn frag(abi: KernelAbi) -> impl Strategy<Value = Fragment> {
    let max_off = match abi {
        KernelAbi::Tcpx => u64::from(u32::MAX),
        KernelAbi::Upstream => u64::MAX,
    };
    prop_oneof![
        any::<u32>().prop_map(|len| Fragment::Linear { len }),
        (0..=max_off, any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            move |(offset, len, token, id)| Fragment::Pool {
                offset,
                len,
                token,
                dmabuf_id: (abi == KernelAbi::Upstream).then_some(id),
            }
        ),
    ]
}

fn abi_and_frags() -> impl Strategy<Value = (KernelAbi, Vec<Fragment>)> {
    prop_oneof![Just(KernelAbi::Tcpx), Just(KernelAbi::Upstream)]
        .prop_flat_map(|abi| (Just(abi), prop::collection::vec(frag(abi), 0..40)))
}

fn total(frags: &[Fragment]) -> usize {
    frags.iter().map(|f| f.len() as usize).sum()
}

proptest! {
    #[test]
    fn built_buffers_parse_back_identically((abi, frags) in abi_and_frags()) {
        let mut buf = Vec::new();
        encode_rx(abi, &frags, &mut buf).unwrap();
        prop_assert_eq!(buf.len(), devmem::sockabi::control_buffer_len_for(abi, frags.len()));
        prop_assert_eq!(parse_rx(abi, &buf, total(&frags), 0).unwrap(), frags.clone());
        let tokens: Vec<u32> = frags.iter().filter_map(Fragment::token).collect();
        prop_assert_eq!(salvage_tokens(abi, &buf), tokens);
    }

    #[test]
    fn the_other_abi_refuses_pool_fragments((abi, frags) in abi_and_frags()) {
        let mut buf = Vec::new();
        encode_rx(abi, &frags, &mut buf).unwrap();
        let other = if abi == KernelAbi::Tcpx { KernelAbi::Upstream } else { KernelAbi::Tcpx };
        if !frags.is_empty() {
            let err = parse_rx(other, &buf, total(&frags), 0).unwrap_err();
            prop_assert!(matches!(err, AbiError::AbiMismatch { found, .. } if found == abi), "{}", err);
        }
    }

    #[test]
    fn truncated_buffers_never_panic((abi, frags) in abi_and_frags(), cut in any::<prop::sample::Index>()) {
        let mut buf = Vec::new();
        encode_rx(abi, &frags, &mut buf).unwrap();
        let cut = cut.index(buf.len() + 1);
        let short = &buf[..cut];
        let tokens: Vec<u32> = frags.iter().filter_map(Fragment::token).collect();
        // Whatever is salvaged is a prefix of what was sent.
        let got = salvage_tokens(abi, short);
        prop_assert_eq!(&tokens[..got.len()], &got[..]);
        match parse_rx(abi, short, total(&frags), 0) {
            // No cmsgs at all reads as plain iov bytes.
            Ok(parsed) if cut == 0 => prop_assert!(parsed.iter().all(|f| f.token().is_none())),
            Ok(parsed) => prop_assert_eq!(&frags[..parsed.len()], &parsed[..]),
            Err(_) => {}
        }
        fuzzing::fuzz_rx(abi, short);
    }

    #[test]
    fn garbled_buffers_never_panic(
        (abi, frags) in abi_and_frags(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        returned in any::<usize>(),
        flags in any::<i32>(),
    ) {
        let mut buf = Vec::new();
        encode_rx(abi, &frags, &mut buf).unwrap();
        if !buf.is_empty() {
            for (i, b) in flips {
                let i = i.index(buf.len());
                buf[i] ^= b;
            }
        }
        if let Ok(parsed) = parse_rx(abi, &buf, returned, flags) {
            prop_assert_eq!(total(&parsed), returned);
            prop_assert_eq!(flags & libc::MSG_CTRUNC, 0);
        }
        let _ = salvage_tokens(abi, &buf);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::fuzz_rx(KernelAbi::Tcpx, &data);
        fuzzing::fuzz_rx(KernelAbi::Upstream, &data);
    }

    #[test]
    fn coalesced_batches_keep_every_token(
        tokens in prop::collection::vec(0u32..4096, 0..3000),
        max_ranges in 1usize..200,
        max_tokens in 1usize..2000,
    ) {
        let ranges = coalesce_tokens(&tokens);
        // Sorted and maximal: no range could absorb its successor's start.
        for w in ranges.windows(2) {
            prop_assert!(w[0].start <= w[1].start);
        }
        let batches = batch_ranges(&ranges, max_ranges, max_tokens);
        let mut back = Vec::new();
        for b in &batches {
            prop_assert!(!b.is_empty() && b.len() <= max_ranges);
            prop_assert!(b.iter().map(|r| r.count as usize).sum::<usize>() <= max_tokens);
            for r in b {
                back.extend((0..r.count).map(|i| r.start + i));
            }
        }
        let mut want = tokens.clone();
        want.sort_unstable();
        back.sort_unstable();
        prop_assert_eq!(back, want);
    }
}
