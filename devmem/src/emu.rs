//! An emulated devmem socket: a software "NIC" for tests and benches.
//!
//! The receiver wraps a connected stream (a plain TCP socket; the sender is
//! an ordinary TCP socket too). [`EmuDevmemSocket::recv_devmem`] behaves like
//! `recvmsg(MSG_SOCK_DEVMEM)`: it reads bytes from the stream, puts payload
//! in [`RxPool`] pages (one fragment per page, never crossing it; host or
//! GPU memory alike, through [`RxPool::land`]), puts some
//! bytes in the caller's linear buffer the way header-split misses do, and
//! writes exactly the control bytes the chosen [`KernelAbi`] kernel writes
//! (`sockabi::encode_rx`), so `sockabi::parse_rx` reads them unchanged.
//! [`EmuDevmemSocket::dontneed`] takes the bytes of
//! `setsockopt(SO_DEVMEM_DONTNEED)` and frees pages. With no free page the
//! receive stalls (`WouldBlock`) until tokens come back.
//!
//! Everything irregular (header bytes, short fragments, offsets inside a
//! page) is drawn from a seeded generator, so a failing run replays.
#![forbid(unsafe_code)]

use std::io::{self, Read};
use std::net::TcpStream;

use crate::pool::{PoolError, RxPool, PAGE_SIZE};
use crate::sockabi::cmsg::cmsg_space;
use crate::sockabi::{
    batch_ranges, coalesce_tokens, decode_token_ranges, encode_rx, encode_token_ranges, AbiError,
    DontNeedOutcome, Fragment, KernelAbi, RecvOutcome, ReleaseReport,
};

/// How the emulated NIC splits the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmuConfig {
    /// Which kernel's control bytes to write.
    pub abi: KernelAbi,
    /// Seed of every irregular choice.
    pub seed: u64,
    /// About one receive in `header_every` starts with linear (header)
    /// bytes; 0 = never.
    pub header_every: u32,
    /// Most linear bytes one receive carries (1..=this, and at most the
    /// caller's linear buffer).
    pub header_max: usize,
    /// About one pool fragment in `short_every` is shorter than a page and
    /// starts inside it; 0 = full pages only.
    pub short_every: u32,
    /// Upstream: the dmabuf id on pool fragments (TCPX carries none).
    pub dmabuf_id: u32,
    /// Most bytes one receive reads from the stream.
    pub max_read: usize,
}

impl EmuConfig {
    /// Defaults for `abi`: headers on ~1/8 of receives, short fragments on
    /// ~1/4, at most 256 KiB per receive.
    pub const fn new(abi: KernelAbi) -> Self {
        EmuConfig {
            abi,
            seed: 1,
            header_every: 8,
            header_max: 128,
            short_every: 4,
            dmabuf_id: 1,
            max_read: 256 << 10,
        }
    }

    /// The same with another seed.
    pub const fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Counters of one emulated socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EmuStats {
    /// Stream reads that returned bytes.
    pub reads: u64,
    /// Bytes received.
    pub bytes: u64,
    /// Pool fragments handed out.
    pub pool_frags: u64,
    /// Linear fragments handed out.
    pub linear_frags: u64,
    /// Bytes put in linear buffers.
    pub linear_bytes: u64,
    /// Receives refused because the pool was full.
    pub stalls: u64,
    /// `SO_DEVMEM_DONTNEED` calls taken.
    pub dontneed_calls: u64,
    /// Tokens freed.
    pub tokens_freed: u64,
    /// Tokens given back that were not outstanding (ignored, as upstream does).
    pub tokens_unknown: u64,
}

/// The emulated devmem receive socket; see the module docs.
#[derive(Debug)]
pub struct EmuDevmemSocket<S = TcpStream> {
    stream: S,
    pool: RxPool,
    cfg: EmuConfig,
    rng: u64,
    /// Bytes read, before they are placed (bounded by `max_read`).
    scratch: Vec<u8>,
    /// Planned (offset in page, len) of this receive's pool fragments.
    shape: Vec<(usize, usize)>,
    frags: Vec<Fragment>,
    cbuf: Vec<u8>,
    stats: EmuStats,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn one_in(rng: &mut u64, n: u32) -> bool {
    n > 0 && splitmix(rng) % u64::from(n) == 0
}

impl<S: Read> EmuDevmemSocket<S> {
    /// Wraps a connected `stream` receiving into `pool`. TCPX offsets are
    /// 32-bit, so a TCPX pool is at most 4 GiB.
    pub fn new(stream: S, pool: RxPool, cfg: EmuConfig) -> Result<Self, PoolError> {
        if cfg.abi == KernelAbi::Tcpx && pool.len() as u64 > 1 << 32 {
            return Err(PoolError::TooLarge {
                size: pool.len() as u64,
                max: 1 << 32,
                abi: cfg.abi.name(),
            });
        }
        Ok(EmuDevmemSocket {
            stream,
            pool,
            cfg,
            rng: cfg.seed,
            scratch: Vec::new(),
            shape: Vec::new(),
            frags: Vec::new(),
            cbuf: Vec::new(),
            stats: EmuStats::default(),
        })
    }

    /// Like `recvmsg(fd, {linear, control}, MSG_SOCK_DEVMEM)`: parse
    /// `control[..control_len]` with `sockabi::parse_rx`. `bytes == 0` is
    /// end of stream. `WouldBlock` when the pool is full (give tokens back)
    /// or the stream is non-blocking and empty.
    pub fn recv_devmem(
        &mut self,
        linear: &mut [u8],
        control: &mut [u8],
    ) -> io::Result<RecvOutcome> {
        self.recv_devmem_up_to(linear, control, usize::MAX)
    }

    /// `recv_devmem` reading at most `limit` bytes, as the kernel reads at
    /// most the length the caller asked for.
    pub fn recv_devmem_up_to(
        &mut self,
        linear: &mut [u8],
        control: &mut [u8],
        limit: usize,
    ) -> io::Result<RecvOutcome> {
        let max_cmsgs = control.len() / cmsg_space(self.cfg.abi.rx_payload_len());
        if max_cmsgs == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the control buffer cannot hold one devmem cmsg; size it with control_buffer_len()",
            ));
        }
        let free = self.pool.free_pages();
        if free == 0 {
            self.stats.stalls += 1;
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "emulated devmem RX pool is full; give tokens back",
            ));
        }
        let mut lin_take = 0;
        if !linear.is_empty() && one_in(&mut self.rng, self.cfg.header_every) {
            let max = self.cfg.header_max.clamp(1, linear.len());
            lin_take = 1 + (splitmix(&mut self.rng) % max as u64) as usize;
        }
        let pool_slots = (max_cmsgs - usize::from(lin_take > 0)).min(free);
        let max_read = self.cfg.max_read.min(limit).max(1);
        let mut cap = lin_take.min(max_read);
        self.shape.clear();
        while self.shape.len() < pool_slots && cap < max_read {
            let (off, len) = if one_in(&mut self.rng, self.cfg.short_every) {
                let len = 1 + (splitmix(&mut self.rng) % PAGE_SIZE as u64) as usize;
                let off = (splitmix(&mut self.rng) % (PAGE_SIZE - len + 1) as u64) as usize;
                (off, len)
            } else {
                (0, PAGE_SIZE)
            };
            let len = len.min(max_read - cap);
            self.shape.push((off, len));
            cap += len;
        }
        self.scratch.resize(cap, 0);
        let got = self.stream.read(&mut self.scratch[..cap])?;
        if got == 0 {
            return Ok(RecvOutcome {
                bytes: 0,
                control_len: 0,
                msg_flags: 0,
            });
        }
        self.place(got, lin_take, linear)?;
        self.cbuf.clear();
        encode_rx(self.cfg.abi, &self.frags, &mut self.cbuf).map_err(io::Error::other)?;
        control[..self.cbuf.len()].copy_from_slice(&self.cbuf);
        Ok(RecvOutcome {
            bytes: got,
            control_len: self.cbuf.len(),
            msg_flags: 0,
        })
    }

    /// Splits `scratch[..got]` into the linear buffer and pool pages.
    fn place(&mut self, got: usize, lin_take: usize, linear: &mut [u8]) -> io::Result<()> {
        self.frags.clear();
        let lin = lin_take.min(got);
        if lin > 0 {
            linear[..lin].copy_from_slice(&self.scratch[..lin]);
            self.frags.push(Fragment::Linear { len: lin as u32 });
            self.stats.linear_frags += 1;
            self.stats.linear_bytes += lin as u64;
        }
        let mut at = lin;
        for &(off, len) in &self.shape {
            if at == got {
                break;
            }
            let take = len.min(got - at);
            // Planned slots never exceed the free pages: this cannot fail.
            let grant = self.pool.alloc(PAGE_SIZE).map_err(io::Error::other)?;
            let start = grant.offset as usize + off;
            self.pool
                .land(start, &self.scratch[at..at + take])
                .map_err(io::Error::other)?;
            self.frags.push(Fragment::Pool {
                offset: start as u64,
                len: take as u32,
                token: grant.token,
                dmabuf_id: (self.cfg.abi == KernelAbi::Upstream).then_some(self.cfg.dmabuf_id),
            });
            self.stats.pool_frags += 1;
            at += take;
        }
        // The receive completes once its payload is where unpack reads it.
        self.pool.commit().map_err(io::Error::other)?;
        self.stats.reads += 1;
        self.stats.bytes += got as u64;
        Ok(())
    }
}

impl<S> EmuDevmemSocket<S> {
    /// Emulates `setsockopt(SOL_SOCKET, SO_DEVMEM_DONTNEED, optval)`: frees
    /// the tokens of `optval`'s `{start, count}` ranges, at most
    /// `max_dontneed_tokens` per call, ignoring tokens not outstanding (as
    /// upstream does). Too many ranges is `EINVAL`, as upstream.
    pub fn dontneed(&mut self, optval: &[u8]) -> Result<DontNeedOutcome, AbiError> {
        let abi = self.cfg.abi;
        let ranges = decode_token_ranges(optval)?;
        if ranges.len() > abi.max_dontneed_ranges() {
            return Err(AbiError::DontNeed {
                abi,
                optname: abi.so_devmem_dontneed(),
                source: io::Error::from_raw_os_error(libc::EINVAL).into(),
            });
        }
        self.stats.dontneed_calls += 1;
        let mut budget = abi.max_dontneed_tokens() as u64;
        let (mut requested, mut freed) = (0u64, 0u64);
        'ranges: for r in &ranges {
            requested += u64::from(r.count);
            for i in 0..r.count {
                if budget == 0 {
                    break 'ranges;
                }
                budget -= 1;
                let Some(t) = r.start.checked_add(i) else {
                    break;
                };
                if self.pool.release(t).is_some() {
                    freed += 1;
                } else {
                    self.stats.tokens_unknown += 1;
                }
            }
        }
        self.stats.tokens_freed += freed;
        Ok(DontNeedOutcome {
            requested,
            freed: abi.dontneed_reports_count().then_some(freed),
        })
    }

    /// Like `sockabi::release_tokens`: coalesces, batches within the ABI's
    /// limits and gives each batch to [`EmuDevmemSocket::dontneed`].
    pub fn release_tokens(&mut self, tokens: &[u32]) -> Result<ReleaseReport, AbiError> {
        let abi = self.cfg.abi;
        let mut report = ReleaseReport {
            freed: abi.dontneed_reports_count().then_some(0),
            ..ReleaseReport::default()
        };
        let ranges = coalesce_tokens(tokens);
        let mut bytes = Vec::new();
        for batch in batch_ranges(
            &ranges,
            abi.max_dontneed_ranges(),
            abi.max_dontneed_tokens(),
        ) {
            bytes.clear();
            encode_token_ranges(&batch, &mut bytes);
            let o = self.dontneed(&bytes)?;
            report.calls += 1;
            report.requested += o.requested;
            report.freed = report.freed.zip(o.freed).map(|(a, b)| a + b);
        }
        Ok(report)
    }

    /// The pool fragments point into (read it to unpack).
    pub fn pool(&self) -> &RxPool {
        &self.pool
    }

    /// The configuration.
    pub fn config(&self) -> &EmuConfig {
        &self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> EmuStats {
        self.stats
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream and the pool back.
    pub fn into_parts(self) -> (S, RxPool) {
        (self.stream, self.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockabi::{control_buffer_len, parse_rx, TokenRange};

    fn emu(abi: KernelAbi, data: Vec<u8>, pages: usize) -> EmuDevmemSocket<io::Cursor<Vec<u8>>> {
        let pool = RxPool::local(pages * PAGE_SIZE).unwrap();
        EmuDevmemSocket::new(io::Cursor::new(data), pool, EmuConfig::new(abi)).unwrap()
    }

    #[test]
    fn full_pool_stalls_until_tokens_return() {
        for abi in KernelAbi::ALL {
            let mut e = emu(abi, vec![7; 5 * PAGE_SIZE], 2);
            let (mut lin, mut ctl) = ([0u8; 0], vec![0u8; control_buffer_len(16)]);
            let o = e.recv_devmem(&mut lin, &mut ctl).unwrap();
            let frags = parse_rx(abi, &ctl[..o.control_len], o.bytes, o.msg_flags).unwrap();
            assert_eq!(frags.len(), 2, "two pages, two fragments");
            let err = e.recv_devmem(&mut lin, &mut ctl).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            assert_eq!(e.stats().stalls, 1);
            let tokens: Vec<u32> = frags.iter().filter_map(|f| f.token()).collect();
            let r = e.release_tokens(&tokens).unwrap();
            assert_eq!((r.calls, r.requested), (1, 2));
            assert!(e.recv_devmem(&mut lin, &mut ctl).unwrap().bytes > 0);
        }
    }

    #[test]
    fn a_control_buffer_too_small_for_one_cmsg_is_refused() {
        let mut e = emu(KernelAbi::Upstream, vec![1; 10], 1);
        let mut ctl = vec![0u8; cmsg_space(KernelAbi::Upstream.rx_payload_len()) - 1];
        let err = e.recv_devmem(&mut [], &mut ctl).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn dontneed_ignores_unknown_tokens_and_refuses_bad_input() {
        let mut e = emu(KernelAbi::Upstream, vec![1; PAGE_SIZE], 4);
        let mut ctl = vec![0u8; control_buffer_len(4)];
        let o = e.recv_devmem(&mut [], &mut ctl).unwrap();
        assert!(o.bytes > 0);
        assert_eq!(e.pool().free_pages(), 4 - e.stats().pool_frags as usize);
        assert!(matches!(
            e.dontneed(&[0; 7]),
            Err(AbiError::BadTokenBytes { len: 7 })
        ));
        let mut many = Vec::new();
        let r = vec![TokenRange { start: 0, count: 1 }; 129];
        encode_token_ranges(&r, &mut many);
        assert!(matches!(e.dontneed(&many), Err(AbiError::DontNeed { .. })));
        // A hostile huge range frees what is outstanding and stops at the cap.
        let mut huge = Vec::new();
        encode_token_ranges(
            &[TokenRange {
                start: 0,
                count: u32::MAX,
            }],
            &mut huge,
        );
        let o = e.dontneed(&huge).unwrap();
        assert_eq!(o.freed, Some(e.stats().pool_frags));
        assert_eq!(e.pool().free_pages(), 4);
        assert_eq!(e.stats().tokens_unknown, 1024 - e.stats().pool_frags);
    }
}
