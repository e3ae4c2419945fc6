//! An emulated devmem socket: a software "NIC" for tests and benches.
//!
//! [`EmuDevmemSocket`] wraps a connected stream (a plain TCP socket; the
//! peer is an ordinary TCP socket too) and implements the [`DevmemSocket`]
//! seam the way a devmem NIC and kernel answer it:
//! - `recv_devmem` reads bytes from the stream, puts payload in [`RxPool`]
//!   pages (one fragment per page, never crossing it; host or GPU memory
//!   alike, through [`RxPool::land`]), puts some bytes in the caller's
//!   linear buffer the way header-split misses do, and writes exactly the
//!   control bytes the chosen [`KernelAbi`] kernel writes
//!   (`sockabi::encode_rx`). With no free page it stalls (`WouldBlock`)
//!   until tokens come back.
//! - `dontneed` takes the bytes of `setsockopt(SO_DEVMEM_DONTNEED)` and
//!   frees pages, answering as the kernel does.
//! - `send_devmem` resolves the TX cmsg to memory bound with
//!   [`EmuTxBinding`], reads the bytes from it and writes them to the
//!   stream; `recv_errqueue` then reports the zero-copy completions with
//!   the kernel's record bytes (`sockabi::encode_zerocopy`).
//!
//! Everything irregular (header bytes, short fragments, offsets inside a
//! page) is drawn from a seeded generator, so a failing run replays.
#![forbid(unsafe_code)]

mod tx;

use std::io::{self, Read, Write};
use std::net::TcpStream;

use crate::pool::{Grant, PoolError, RxPool, PAGE_SIZE};
use crate::sockabi::abi::MSG_CTRUNC;
use crate::sockabi::cmsg::cmsg_space;
use crate::sockabi::{
    decode_token_ranges, decode_tx, encode_rx, encode_zerocopy, DevmemSocket, Fragment, KernelAbi,
    RecvOutcome, TxIov, TxTarget, ZcRange,
};

pub use tx::{EmuTxBinding, TxMemory};

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
    /// Most bytes one devmem send writes to the stream.
    pub max_write: usize,
    /// Error-queue records as an IPv6 socket's (`IPV6_RECVERR`).
    pub ipv6: bool,
    /// Fill pages with this byte as their tokens come back, so that a
    /// fragment read after its token went back shows as wrong bytes.
    pub poison: Option<u8>,
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
            max_write: 256 << 10,
            ipv6: false,
            poison: None,
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
    /// Devmem sends that wrote bytes.
    pub tx_sends: u64,
    /// Bytes they wrote.
    pub tx_bytes: u64,
    /// Zero-copy ids reported complete.
    pub tx_completed: u64,
}

/// The emulated devmem receive socket; see the module docs.
#[derive(Debug)]
pub struct EmuDevmemSocket<S = TcpStream> {
    stream: S,
    pool: RxPool,
    cfg: EmuConfig,
    rng: u64,
    /// Planned (offset in page, len) of this receive's pool fragments.
    shape: Vec<(usize, usize)>,
    /// The pages lent for them, and where in the pool each lands.
    grants: Vec<Grant>,
    ranges: Vec<(usize, usize)>,
    frags: Vec<Fragment>,
    cbuf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Next zero-copy id, and the first not yet reported.
    zc_next: u32,
    zc_reported: u32,
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
            shape: Vec::new(),
            grants: Vec::new(),
            ranges: Vec::new(),
            frags: Vec::new(),
            cbuf: Vec::new(),
            tx_buf: Vec::new(),
            zc_next: 0,
            zc_reported: 0,
            stats: EmuStats::default(),
        })
    }

    /// `recvmsg(MSG_SOCK_DEVMEM)`: reads at most `linear.len()` bytes.
    fn recv(&mut self, linear: &mut [u8], control: &mut [u8]) -> io::Result<RecvOutcome> {
        let limit = linear.len();
        if limit == 0 {
            // recvmsg of 0 bytes returns 0.
            return Ok(RecvOutcome {
                bytes: 0,
                control_len: 0,
                msg_flags: 0,
            });
        }
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
        // The NIC's DMA: the stream is read straight into the linear buffer
        // and the pages planned above (one readv, no copy in between).
        self.grants.clear();
        self.ranges.clear();
        for &(off, len) in &self.shape {
            // Planned slots never exceed the free pages: one page always fits.
            let g = self.pool.alloc(PAGE_SIZE).map_err(io::Error::other)?;
            self.ranges.push((g.offset as usize + off, len));
            self.grants.push(g);
        }
        let got = {
            let (head, _) = linear.split_at_mut(lin_take);
            let mut iov = vec![io::IoSliceMut::new(head)];
            iov.extend(self.pool.landing(&self.ranges).map_err(io::Error::other)?);
            self.stream.read_vectored(&mut iov)
        };
        let got = match got {
            Ok(n) => n,
            Err(e) => {
                self.return_unused(0);
                return Err(e);
            }
        };
        if got == 0 {
            self.return_unused(0);
            return Ok(RecvOutcome {
                bytes: 0,
                control_len: 0,
                msg_flags: 0,
            });
        }
        self.place(got, lin_take)?;
        self.cbuf.clear();
        encode_rx(self.cfg.abi, &self.frags, &mut self.cbuf).map_err(io::Error::other)?;
        control[..self.cbuf.len()].copy_from_slice(&self.cbuf);
        Ok(RecvOutcome {
            bytes: got,
            control_len: self.cbuf.len(),
            msg_flags: 0,
        })
    }

    /// Describes what the read put where: the linear bytes, then a fragment
    /// per page that received any; pages the read did not reach go back.
    fn place(&mut self, got: usize, lin_take: usize) -> io::Result<()> {
        self.frags.clear();
        let lin = lin_take.min(got);
        if lin > 0 {
            self.frags.push(Fragment::Linear { len: lin as u32 });
            self.stats.linear_frags += 1;
            self.stats.linear_bytes += lin as u64;
        }
        let mut at = lin;
        let mut used = 0;
        for (&(start, len), g) in self.ranges.iter().zip(&self.grants) {
            if at == got {
                break;
            }
            let take = len.min(got - at);
            self.frags.push(Fragment::Pool {
                offset: start as u64,
                len: take as u32,
                token: g.token,
                dmabuf_id: (self.cfg.abi == KernelAbi::Upstream).then_some(self.cfg.dmabuf_id),
            });
            self.stats.pool_frags += 1;
            at += take;
            used += 1;
        }
        self.return_unused(used);
        // A GPU pool's readers get the payload through its readers' stream,
        // which copies it there first: nothing to wait for here.
        self.stats.reads += 1;
        self.stats.bytes += got as u64;
        Ok(())
    }

    /// Pages planned for a read that did not reach them were never lent
    /// to the caller: they go straight back.
    fn return_unused(&mut self, used: usize) {
        for g in self.grants.drain(used..) {
            self.pool.release(g.token);
        }
    }
}

impl<S> EmuDevmemSocket<S> {
    /// `setsockopt(SO_DEVMEM_DONTNEED)`: frees the tokens of `optval`'s
    /// `{start, count}` ranges, at most `max_dontneed_tokens` per call,
    /// ignoring tokens not outstanding; a length that is 0 or not a multiple
    /// of 8, or more than `max_dontneed_ranges` ranges, is `EINVAL`: what
    /// upstream answers (`net/core/sock.c` `sock_devmem_dontneed`).
    fn free_tokens(&mut self, optval: &[u8]) -> io::Result<u32> {
        let abi = self.cfg.abi;
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let ranges = decode_token_ranges(optval).map_err(|_| einval())?;
        if ranges.is_empty() || ranges.len() > abi.max_dontneed_ranges() {
            return Err(einval());
        }
        self.stats.dontneed_calls += 1;
        let mut budget = abi.max_dontneed_tokens() as u64;
        let mut freed = 0u32;
        let mut poisoned = false;
        'ranges: for r in &ranges {
            for i in 0..r.count {
                if budget == 0 {
                    break 'ranges;
                }
                budget -= 1;
                let Some(t) = r.start.checked_add(i) else {
                    break;
                };
                if let (Some(byte), Some(g)) = (self.cfg.poison, self.pool.pages().lookup(t)) {
                    self.pool
                        .land(g.offset as usize, &vec![byte; g.len()])
                        .map_err(io::Error::other)?;
                    poisoned = true;
                }
                if self.pool.release(t).is_some() {
                    freed += 1;
                } else {
                    self.stats.tokens_unknown += 1;
                }
            }
        }
        if poisoned {
            self.pool.commit().map_err(io::Error::other)?;
        }
        self.stats.tokens_freed += u64::from(freed);
        Ok(if abi.dontneed_reports_count() {
            freed
        } else {
            0
        })
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

impl<S: Write> EmuDevmemSocket<S> {
    /// `sendmsg(MSG_ZEROCOPY)` with a devmem TX cmsg: the bytes come from
    /// the memory the cmsg names, as the NIC would read them.
    fn send(&mut self, iov: &[TxIov], control: &[u8]) -> io::Result<usize> {
        let abi = self.cfg.abi;
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        // The kernel refuses what it cannot resolve with EINVAL (a bad cmsg,
        // an unknown binding: what this machine's kernel answers).
        let target = decode_tx(abi, control).map_err(|_| einval())?;
        let (id, start) = match target {
            TxTarget::Tcpx { dmabuf_fd, offset } => (
                dmabuf_fd as u32,
                Some(u64::try_from(offset).map_err(|_| einval())?),
            ),
            TxTarget::Upstream { binding_id } => (binding_id, None),
        };
        let memory = tx::lookup(id).ok_or_else(einval)?;
        let want: usize = iov.iter().map(|v| v.len).sum();
        let n = want.min(self.cfg.max_write);
        self.tx_buf.resize(n, 0);
        let mut at = 0;
        for v in iov {
            if at == n {
                break;
            }
            let take = v.len.min(n - at);
            // TCPX: one run from the cmsg's offset; upstream: each iov names its own.
            let from = match start {
                Some(s) => s + at as u64,
                None => v.base,
            };
            memory.read(from, &mut self.tx_buf[at..at + take])?;
            at += take;
        }
        if n == 0 {
            return Ok(0);
        }
        let sent = self.stream.write(&self.tx_buf[..n])?;
        if sent > 0 {
            self.zc_next = self.zc_next.wrapping_add(1);
            self.stats.tx_sends += 1;
            self.stats.tx_bytes += sent as u64;
        }
        Ok(sent)
    }

    /// One record for every id not yet reported: the bytes are in the
    /// socket, so the emulated NIC is done with them.
    fn errqueue(&mut self, control: &mut [u8]) -> io::Result<RecvOutcome> {
        if self.zc_next == self.zc_reported {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let range = ZcRange {
            lo: self.zc_reported,
            hi: self.zc_next.wrapping_sub(1),
            copied: false,
        };
        self.cbuf.clear();
        encode_zerocopy(range, self.cfg.ipv6, &mut self.cbuf);
        if self.cbuf.len() > control.len() {
            // The kernel writes what fits, flags the truncation and drops the record.
            let n = control.len();
            control.copy_from_slice(&self.cbuf[..n]);
            self.zc_reported = self.zc_next;
            return Ok(RecvOutcome {
                bytes: 0,
                control_len: n,
                msg_flags: libc::MSG_ERRQUEUE | MSG_CTRUNC,
            });
        }
        control[..self.cbuf.len()].copy_from_slice(&self.cbuf);
        self.zc_reported = self.zc_next;
        self.stats.tx_completed += range.count();
        Ok(RecvOutcome {
            bytes: 0,
            control_len: self.cbuf.len(),
            msg_flags: libc::MSG_ERRQUEUE,
        })
    }
}

impl<S: Read + Write + Send> DevmemSocket for EmuDevmemSocket<S> {
    fn abi(&self) -> KernelAbi {
        self.cfg.abi
    }

    fn recv_devmem(&mut self, linear: &mut [u8], control: &mut [u8]) -> io::Result<RecvOutcome> {
        self.recv(linear, control)
    }

    fn dontneed(&mut self, optval: &[u8]) -> io::Result<u32> {
        self.free_tokens(optval)
    }

    fn send_devmem(&mut self, iov: &[TxIov], control: &[u8]) -> io::Result<usize> {
        self.send(iov, control)
    }

    fn recv_errqueue(&mut self, control: &mut [u8]) -> io::Result<RecvOutcome> {
        self.errqueue(control)
    }

    fn rx_memory(&self) -> Option<&RxPool> {
        Some(&self.pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockabi::{
        control_buffer_len, encode_token_ranges, encode_tx, parse_errqueue, parse_rx,
        release_tokens, ErrRecord, TokenRange,
    };
    use std::sync::Arc;

    fn emu(abi: KernelAbi, data: Vec<u8>, pages: usize) -> EmuDevmemSocket<io::Cursor<Vec<u8>>> {
        let pool = RxPool::local(pages * PAGE_SIZE).unwrap();
        EmuDevmemSocket::new(io::Cursor::new(data), pool, EmuConfig::new(abi)).unwrap()
    }

    fn errno(e: io::Error) -> Option<i32> {
        e.raw_os_error()
    }

    #[test]
    fn full_pool_stalls_until_tokens_return() {
        for abi in KernelAbi::ALL {
            let mut e = emu(abi, vec![7; 5 * PAGE_SIZE], 2);
            let (mut lin, mut ctl) = (vec![0u8; 64 << 10], vec![0u8; control_buffer_len(16)]);
            let o = e.recv_devmem(&mut lin, &mut ctl).unwrap();
            let frags = parse_rx(abi, &ctl[..o.control_len], o.bytes, o.msg_flags).unwrap();
            assert_eq!(frags.iter().filter(|f| f.token().is_some()).count(), 2);
            let err = e.recv_devmem(&mut lin, &mut ctl).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            assert_eq!(e.stats().stalls, 1);
            let tokens: Vec<u32> = frags.iter().filter_map(|f| f.token()).collect();
            let r = release_tokens(&mut e, &tokens).unwrap();
            assert_eq!((r.calls, r.requested), (1, 2));
            assert_eq!(r.freed, abi.dontneed_reports_count().then_some(2));
            assert!(e.recv_devmem(&mut lin, &mut ctl).unwrap().bytes > 0);
        }
    }

    #[test]
    fn the_linear_buffer_bounds_the_read_as_the_iov_does() {
        let mut e = emu(KernelAbi::Tcpx, vec![3; 5 * PAGE_SIZE], 8);
        let mut ctl = vec![0u8; control_buffer_len(16)];
        let o = e.recv_devmem(&mut [0u8; 100], &mut ctl).unwrap();
        assert!(o.bytes > 0 && o.bytes <= 100, "{}", o.bytes);
        // An empty iov reads nothing, and recvmsg says 0.
        assert_eq!(e.recv_devmem(&mut [], &mut ctl).unwrap().bytes, 0);
    }

    #[test]
    fn a_control_buffer_too_small_for_one_cmsg_is_refused() {
        let mut e = emu(KernelAbi::Upstream, vec![1; 10], 1);
        let mut ctl = vec![0u8; cmsg_space(KernelAbi::Upstream.rx_payload_len()) - 1];
        let err = e.recv_devmem(&mut [0; 10], &mut ctl).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn dontneed_answers_as_upstream_does() {
        let mut e = emu(KernelAbi::Upstream, vec![1; PAGE_SIZE], 4);
        let mut ctl = vec![0u8; control_buffer_len(4)];
        let o = e.recv_devmem(&mut [0; PAGE_SIZE], &mut ctl).unwrap();
        assert!(o.bytes > 0);
        assert_eq!(e.pool().free_pages(), 4 - e.stats().pool_frags as usize);
        // What this machine's kernel answers for 0 and 7 bytes: EINVAL.
        assert_eq!(e.dontneed(&[]).map_err(errno), Err(Some(libc::EINVAL)));
        assert_eq!(e.dontneed(&[0; 7]).map_err(errno), Err(Some(libc::EINVAL)));
        let mut many = Vec::new();
        let r = vec![TokenRange { start: 0, count: 1 }; 129];
        encode_token_ranges(&r, &mut many);
        assert_eq!(e.dontneed(&many).map_err(errno), Err(Some(libc::EINVAL)));
        // A hostile huge range frees what is outstanding and stops at the cap.
        let mut huge = Vec::new();
        encode_token_ranges(
            &[TokenRange {
                start: 0,
                count: u32::MAX,
            }],
            &mut huge,
        );
        let freed = e.dontneed(&huge).unwrap();
        assert_eq!(u64::from(freed), e.stats().pool_frags);
        assert_eq!(e.pool().free_pages(), 4);
        assert_eq!(e.stats().tokens_unknown, 1024 - e.stats().pool_frags);
    }

    #[test]
    fn released_pages_are_poisoned_when_asked() {
        let pool = RxPool::local(2 * PAGE_SIZE).unwrap();
        let mut cfg = EmuConfig::new(KernelAbi::Tcpx);
        cfg.poison = Some(0xDB);
        cfg.short_every = 0;
        cfg.header_every = 0;
        let mut e = EmuDevmemSocket::new(io::Cursor::new(vec![7; PAGE_SIZE]), pool, cfg).unwrap();
        let mut ctl = vec![0u8; control_buffer_len(4)];
        let o = e.recv_devmem(&mut [0; PAGE_SIZE], &mut ctl).unwrap();
        let frags = parse_rx(KernelAbi::Tcpx, &ctl[..o.control_len], o.bytes, 0).unwrap();
        let Fragment::Pool { offset, token, .. } = frags[0] else {
            panic!("{frags:?}")
        };
        let at = offset as usize;
        assert_eq!(e.pool().host().unwrap()[at], 7);
        release_tokens(&mut e, &[token]).unwrap();
        assert!(e.pool().host().unwrap()[at..at + PAGE_SIZE]
            .iter()
            .all(|b| *b == 0xDB));
    }

    #[test]
    fn devmem_sends_read_the_bound_memory_and_complete_in_the_error_queue() {
        let src: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let binding = EmuTxBinding::bind(Arc::new(src.clone()));
        for abi in KernelAbi::ALL {
            let pool = RxPool::local(PAGE_SIZE).unwrap();
            let mut e =
                EmuDevmemSocket::new(io::Cursor::new(Vec::new()), pool, EmuConfig::new(abi))
                    .unwrap();
            let mut host = vec![0u8; 5000];
            let mut sent = 0;
            for (off, len) in [(100u64, 5000usize), (5100, 1), (5101, 4000)] {
                let (target, base) = binding.target(abi, off).unwrap();
                let base = base.unwrap_or(host.as_mut_ptr() as u64);
                let n = e
                    .send_devmem(&[TxIov { base, len }], encode_tx(target).as_bytes())
                    .unwrap();
                assert_eq!(n, len);
                sent += n;
            }
            let (out, _) = e.into_parts();
            assert!(out.into_inner() == src[100..100 + sent], "{abi:?}");
            // Fresh socket: completions come as one record, then none.
            let pool = RxPool::local(PAGE_SIZE).unwrap();
            let mut e =
                EmuDevmemSocket::new(io::Cursor::new(Vec::new()), pool, EmuConfig::new(abi))
                    .unwrap();
            for _ in 0..3 {
                let (target, base) = binding.target(abi, 0).unwrap();
                let base = base.unwrap_or(host.as_mut_ptr() as u64);
                let iov = [TxIov { base, len: 10 }];
                e.send_devmem(&iov, encode_tx(target).as_bytes()).unwrap();
            }
            let mut ctl = [0u8; 128];
            let o = e.recv_errqueue(&mut ctl).unwrap();
            assert_eq!(o.msg_flags & libc::MSG_ERRQUEUE, libc::MSG_ERRQUEUE);
            assert_eq!(
                parse_errqueue(&ctl[..o.control_len]).unwrap(),
                [ErrRecord::Zerocopy(ZcRange {
                    lo: 0,
                    hi: 2,
                    copied: false
                })]
            );
            let again = e.recv_errqueue(&mut ctl).unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
        }
    }

    #[test]
    fn devmem_sends_to_unknown_or_outside_memory_fail_as_the_kernel_does() {
        let binding = EmuTxBinding::bind(Arc::new(vec![0u8; 100]));
        let pool = RxPool::local(PAGE_SIZE).unwrap();
        let mut e = EmuDevmemSocket::new(
            io::Cursor::new(Vec::new()),
            pool,
            EmuConfig::new(KernelAbi::Upstream),
        )
        .unwrap();
        let unknown = encode_tx(TxTarget::Upstream { binding_id: 7 });
        let iov = [TxIov { base: 0, len: 10 }];
        assert_eq!(
            e.send_devmem(&iov, unknown.as_bytes()).map_err(errno),
            Err(Some(libc::EINVAL))
        );
        let (target, _) = binding.target(KernelAbi::Upstream, 0).unwrap();
        let past = [TxIov { base: 95, len: 10 }];
        assert_eq!(
            e.send_devmem(&past, encode_tx(target).as_bytes())
                .map_err(errno),
            Err(Some(libc::EFAULT))
        );
        // The other ABI's cmsg is as unknown to it as to the kernel.
        let (tcpx, _) = binding.target(KernelAbi::Tcpx, 0).unwrap();
        assert_eq!(
            e.send_devmem(&iov, encode_tx(tcpx).as_bytes())
                .map_err(errno),
            Err(Some(libc::EINVAL))
        );
        drop(binding);
        assert_eq!(
            e.send_devmem(&iov, encode_tx(target).as_bytes())
                .map_err(errno),
            Err(Some(libc::EINVAL)),
            "an unbound id is gone"
        );
        assert_eq!(e.stats().tx_sends, 0);
    }
}
