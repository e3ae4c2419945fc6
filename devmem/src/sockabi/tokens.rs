//! Giving fragment tokens back: coalescing, batching, serialising.
//!
//! Both ABIs take an array of `{ u32 token_start; u32 token_count; }`:
//! TCPX `struct devmemtoken` (plugin `src/devcomm/unpack_defs1.h`), upstream
//! `struct dmabuf_token` (`include/uapi/linux/uio.h`). The call itself goes
//! through the [`DevmemSocket`] seam, kernel or emulator alike.
#![forbid(unsafe_code)]

use super::cmsg::array;
use super::socket::DevmemSocket;
use super::AbiError;

/// `{ u32 token_start; u32 token_count; }`, laid out as the kernel reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TokenRange {
    /// First token.
    pub start: u32,
    /// Number of consecutive tokens.
    pub count: u32,
}

/// Bytes of one serialised [`TokenRange`].
pub const TOKEN_RANGE_LEN: usize = 8;

/// Sorts tokens and merges consecutive ones into ranges.
///
/// A multiset: a token given twice stays twice (upstream kernels may hand
/// out the same page token for two fragments and count references).
pub fn coalesce_tokens(tokens: &[u32]) -> Vec<TokenRange> {
    let mut sorted = tokens.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<TokenRange> = Vec::new();
    for t in sorted {
        match out.last_mut() {
            Some(r) if r.start.checked_add(r.count) == Some(t) => r.count += 1,
            _ => out.push(TokenRange { start: t, count: 1 }),
        }
    }
    out
}

/// Splits ranges into batches of at most `max_ranges` ranges and
/// `max_tokens` tokens each (a range larger than `max_tokens` is cut).
/// Empty ranges are dropped; limits of 0 are treated as 1.
pub fn batch_ranges(
    ranges: &[TokenRange],
    max_ranges: usize,
    max_tokens: usize,
) -> Vec<Vec<TokenRange>> {
    let max_ranges = max_ranges.max(1);
    let max_tokens = u32::try_from(max_tokens.max(1)).unwrap_or(u32::MAX);
    let mut batches = Vec::new();
    let mut cur: Vec<TokenRange> = Vec::new();
    let mut cur_tokens: u32 = 0;
    for r in ranges {
        let mut rest = *r;
        while rest.count > 0 {
            if cur.len() == max_ranges || cur_tokens == max_tokens {
                batches.push(std::mem::take(&mut cur));
                cur_tokens = 0;
            }
            let take = rest.count.min(max_tokens - cur_tokens);
            cur.push(TokenRange {
                start: rest.start,
                count: take,
            });
            cur_tokens += take;
            rest.start = rest.start.wrapping_add(take);
            rest.count -= take;
        }
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Appends the bytes `setsockopt(SO_DEVMEM_DONTNEED)` reads, in host order.
pub fn encode_token_ranges(ranges: &[TokenRange], out: &mut Vec<u8>) {
    out.reserve(ranges.len() * TOKEN_RANGE_LEN);
    for r in ranges {
        out.extend_from_slice(&r.start.to_ne_bytes());
        out.extend_from_slice(&r.count.to_ne_bytes());
    }
}

/// Reads setsockopt bytes back (for the emulated devmem socket).
pub fn decode_token_ranges(bytes: &[u8]) -> Result<Vec<TokenRange>, AbiError> {
    let chunks = bytes.chunks_exact(TOKEN_RANGE_LEN);
    if !chunks.remainder().is_empty() {
        return Err(AbiError::BadTokenBytes { len: bytes.len() });
    }
    Ok(chunks
        .map(|c| TokenRange {
            start: u32::from_ne_bytes(array(&c[0..4])),
            count: u32::from_ne_bytes(array(&c[4..8])),
        })
        .collect())
}

/// What one `SO_DEVMEM_DONTNEED` call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DontNeedOutcome {
    /// Tokens in the batch.
    pub requested: u64,
    /// Tokens the kernel says it freed (upstream); `None` where the kernel
    /// reports only success (TCPX returns 0).
    pub freed: Option<u64>,
}

/// One `SO_DEVMEM_DONTNEED` call through `sock` with `ranges`.
///
/// Keep a batch within [`super::KernelAbi::max_dontneed_ranges`] and
/// [`super::KernelAbi::max_dontneed_tokens`] (see [`batch_ranges`]); upstream
/// refuses more ranges with `EINVAL` and frees at most 1024 tokens.
pub fn return_token_batch(
    sock: &mut (impl DevmemSocket + ?Sized),
    ranges: &[TokenRange],
) -> Result<DontNeedOutcome, AbiError> {
    let abi = sock.abi();
    let requested = ranges.iter().map(|r| u64::from(r.count)).sum();
    if ranges.is_empty() {
        return Ok(DontNeedOutcome {
            requested,
            freed: abi.dontneed_reports_count().then_some(0),
        });
    }
    let mut bytes = Vec::with_capacity(ranges.len() * TOKEN_RANGE_LEN);
    encode_token_ranges(ranges, &mut bytes);
    let ret = sock.dontneed(&bytes).map_err(|source| AbiError::DontNeed {
        abi,
        optname: abi.so_devmem_dontneed(),
        source: source.into(),
    })?;
    Ok(DontNeedOutcome {
        requested,
        freed: abi.dontneed_reports_count().then_some(u64::from(ret)),
    })
}

/// Totals of a [`release_tokens`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReleaseReport {
    /// setsockopt calls made.
    pub calls: usize,
    /// Tokens given back.
    pub requested: u64,
    /// Tokens the kernel freed (upstream); fewer than `requested` means
    /// tokens it did not hold (double return) or a kernel leak.
    pub freed: Option<u64>,
}

/// Coalesces `tokens`, batches them within the ABI's limits and gives them
/// back through `sock`; stops at the first failing call.
pub fn release_tokens(
    sock: &mut (impl DevmemSocket + ?Sized),
    tokens: &[u32],
) -> Result<ReleaseReport, AbiError> {
    let abi = sock.abi();
    let ranges = coalesce_tokens(tokens);
    let mut report = ReleaseReport {
        freed: abi.dontneed_reports_count().then_some(0),
        ..ReleaseReport::default()
    };
    for batch in batch_ranges(
        &ranges,
        abi.max_dontneed_ranges(),
        abi.max_dontneed_tokens(),
    ) {
        let o = return_token_batch(sock, &batch)?;
        report.calls += 1;
        report.requested += o.requested;
        report.freed = report.freed.zip(o.freed).map(|(a, b)| a + b);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u32, count: u32) -> TokenRange {
        TokenRange { start, count }
    }

    #[test]
    fn layout_is_two_u32() {
        assert_eq!(std::mem::size_of::<TokenRange>(), TOKEN_RANGE_LEN);
        assert_eq!(std::mem::offset_of!(TokenRange, start), 0);
        assert_eq!(std::mem::offset_of!(TokenRange, count), 4);
        assert_eq!(
            std::mem::size_of::<TokenRange>(),
            std::mem::size_of::<libc::dmabuf_token>()
        );
    }

    #[test]
    fn coalesce_sorts_and_merges() {
        assert_eq!(coalesce_tokens(&[]), vec![]);
        assert_eq!(coalesce_tokens(&[7, 3, 4, 5, 9, 8]), vec![r(3, 3), r(7, 3)]);
        assert_eq!(coalesce_tokens(&[1, 3]), vec![r(1, 1), r(3, 1)]);
    }

    #[test]
    fn coalesce_keeps_duplicates() {
        let got = coalesce_tokens(&[5, 6, 5, 6]);
        let total: u32 = got.iter().map(|r| r.count).sum();
        assert_eq!(total, 4);
        assert_eq!(got, vec![r(5, 1), r(5, 2), r(6, 1)]);
    }

    #[test]
    fn coalesce_does_not_wrap_at_u32_max() {
        assert_eq!(
            coalesce_tokens(&[u32::MAX, 0, u32::MAX - 1]),
            vec![r(0, 1), r(u32::MAX - 1, 2)]
        );
    }

    #[test]
    fn batches_respect_both_limits() {
        let ranges = [r(0, 5), r(10, 1), r(20, 1), r(30, 1)];
        assert_eq!(
            batch_ranges(&ranges, 2, 100),
            vec![vec![r(0, 5), r(10, 1)], vec![r(20, 1), r(30, 1)]]
        );
        assert_eq!(
            batch_ranges(&ranges, 10, 3),
            vec![
                vec![r(0, 3)],
                vec![r(3, 2), r(10, 1)],
                vec![r(20, 1), r(30, 1)]
            ]
        );
        assert_eq!(
            batch_ranges(&[r(0, 0)], 1, 1),
            Vec::<Vec<TokenRange>>::new()
        );
        // Upstream limits: 3000 scattered tokens -> 128 ranges per call.
        let scattered: Vec<u32> = (0..3000).map(|i| i * 2).collect();
        let b = batch_ranges(&coalesce_tokens(&scattered), 128, 1024);
        assert!(b.iter().all(|b| b.len() <= 128));
        assert_eq!(b.len(), 3000usize.div_ceil(128));
        // 5000 consecutive tokens -> one range cut at 1024 tokens.
        let run: Vec<u32> = (0..5000).collect();
        let b = batch_ranges(&coalesce_tokens(&run), 128, 1024);
        assert_eq!(b.len(), 5);
        assert_eq!(b[4], vec![r(4096, 904)]);
    }

    #[test]
    fn bytes_round_trip_in_host_order() {
        let ranges = [r(1, 2), r(0x01020304, 0xA0B0C0D0)];
        let mut bytes = Vec::new();
        encode_token_ranges(&ranges, &mut bytes);
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[..8], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(decode_token_ranges(&bytes).unwrap(), ranges.to_vec());
        assert!(matches!(
            decode_token_ranges(&bytes[..9]),
            Err(AbiError::BadTokenBytes { len: 9 })
        ));
    }
}
