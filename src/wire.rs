//! The peer wire protocol (docs/PROTOCOL.md), sans I/O: byte layouts in,
//! typed headers out. Parsers never panic on hostile input.
//!
//! Every header starts with the same 12-byte prefix:
//! `magic u32 | version u8 | kind u8 | header_len u16 | payload_len u32`
//! (little-endian), checked on receipt; reserved fields must be zero.
//! Kinds 10-12 (Retire, Placed, Dial) carry data-socket failover.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::{Error, Result};

pub const MAGIC: u32 = u32::from_le_bytes(*b"TCPX");
/// Version 2: receiver-driven chunks (Post), acknowledgements, heartbeats.
pub const VERSION: u8 = 2;
pub const PREFIX_LEN: usize = 12;
pub const HELLO_LEN: usize = 52;
pub const WELCOME_LEN: usize = 28;
pub const MSG_LEN: usize = 40;
pub const CHUNK_LEN: usize = 32;
pub const POST_LEN: usize = 28;
/// One buffer of a Post: `len u64 | tag i32`.
pub const POST_BUF_LEN: usize = 12;
pub const ACK_LEN: usize = 20;
pub const PING_LEN: usize = 20;
pub const REJECT_LEN: usize = 20;
pub const BYE_LEN: usize = 20;
pub const RETIRE_LEN: usize = 20;
pub const PLACED_LEN: usize = 32;
/// Largest bitmap one Placed carries (chunks `first .. first + 8·4096`).
pub const MAX_PLACED_BYTES: usize = 4096;
pub const DIAL_LEN: usize = 36;
/// One NIC address in a Welcome payload.
pub const ADDR_LEN: usize = 20;
/// Largest header of any kind: the size of a receive buffer for one header.
pub const MAX_HEADER_LEN: usize = HELLO_LEN;
/// Most buffers one Post (one grouped receive) names.
pub const MAX_POST_BUFS: usize = crate::config::MAX_RECVS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Msg = 3,
    Chunk = 4,
    Post = 5,
    Ack = 6,
    Ping = 7,
    Reject = 8,
    Bye = 9,
    Retire = 10,
    Placed = 11,
    Dial = 12,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Msg,
            4 => Kind::Chunk,
            5 => Kind::Post,
            6 => Kind::Ack,
            7 => Kind::Ping,
            8 => Kind::Reject,
            9 => Kind::Bye,
            10 => Kind::Retire,
            11 => Kind::Placed,
            12 => Kind::Dial,
            _ => return None,
        })
    }
    pub fn header_len(self) -> usize {
        match self {
            Kind::Hello => HELLO_LEN,
            Kind::Welcome => WELCOME_LEN,
            Kind::Msg => MSG_LEN,
            Kind::Chunk => CHUNK_LEN,
            Kind::Post => POST_LEN,
            Kind::Ack => ACK_LEN,
            Kind::Ping => PING_LEN,
            Kind::Reject => REJECT_LEN,
            Kind::Bye => BYE_LEN,
            Kind::Retire => RETIRE_LEN,
            Kind::Placed => PLACED_LEN,
            Kind::Dial => DIAL_LEN,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub kind: Kind,
    pub payload_len: u32,
}

/// Role of a socket, announced in its Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Control,
    Data { index: u16 },
}

/// First message on every socket, client to server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub secret: [u8; 16],
    /// 0 on the control socket; the id from Welcome on data sockets.
    pub comm_id: u64,
    pub role: Role,
    /// Data sockets the client will open (control socket only).
    pub n_data: u16,
    /// Largest message the client (the sender) sends inline (control socket only).
    pub inline_threshold: u32,
    /// The client's peer timeout in ms, 0 = none: the server's heartbeats
    /// come often enough for it (control socket only).
    pub peer_timeout_ms: u32,
}

/// Server's answer on the control socket; `n_nics` addresses follow as payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub comm_id: u64,
    pub n_nics: u16,
    /// The largest inline message the server (the receiver) accepts, in
    /// KiB: 64 ..= 256 (0 on the wire reads as 64).
    pub inline_kib: u16,
    /// The server's peer timeout in ms, 0 = none.
    pub peer_timeout_ms: u32,
}

/// `Welcome::inline_kib` bounds: what every receiver accepts, and the most.
pub const MIN_INLINE_KIB: u16 = (crate::config::MAX_INLINE / 1024) as u16;
pub const MAX_INLINE_KIB: u16 = (crate::config::MAX_INLINE_IDLE / 1024) as u16;

pub const MSG_INLINE: u16 = 1;

/// One message announced on the control socket, sender to receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub seq: u64,
    pub size: u64,
    pub tag: i32,
    /// Chunk `k` of a chunked message covers bytes `[k·chunk_size, …)`.
    pub chunk_size: u32,
    pub flags: u16,
}

impl Msg {
    pub fn is_inline(&self) -> bool {
        self.flags & MSG_INLINE != 0
    }
}

/// One chunk on a data socket; `payload_len` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
}

/// A posted receive, receiver to sender: the sender matches its messages
/// against these exactly as the receiver does. `n` buffers follow as payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// Counts posts from 0; a gap is a protocol error.
    pub post_seq: u64,
    /// `(len, tag)` of each buffer, in posting order.
    pub bufs: Vec<(u64, i32)>,
}

/// Every chunk of message `seq` is in place at the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub seq: u64,
}

/// A heartbeat; `count` numbers them (diagnostics only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub count: u64,
}

/// Why a listener refused a connection (sent before it closes the socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub reason: u16,
}

/// The last frame of a comm closed on purpose (either direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bye;

/// `Reject::reason`: the client speaks another wire version.
pub const REJECT_VERSION: u16 = 1;

/// The sender took data socket `index` (of `generation`) out of use:
/// the receiver closes its end and answers with Placed for every message
/// in flight, so the sender re-sends what did not arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retire {
    pub index: u16,
    pub generation: u32,
}

/// Which chunks of message `seq` are in place at the receiver: bit `j` of
/// byte `b` of `bits` stands for chunk `first + 8·b + j`. The payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub seq: u64,
    /// A multiple of 8.
    pub first: u64,
    /// 1..=MAX_PLACED_BYTES bytes.
    pub bits: Vec<u8>,
}

/// The receiver invites a reconnect of data socket `index` as `generation`:
/// the sender connects to `addr` and sends a data Hello whose secret is
/// `token`. The address is the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dial {
    pub index: u16,
    pub generation: u32,
    pub token: [u8; 16],
    pub addr: SocketAddr,
}

fn put_prefix(b: &mut [u8], kind: Kind, payload_len: u32) {
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4] = VERSION;
    b[5] = kind as u8;
    b[6..8].copy_from_slice(&(kind.header_len() as u16).to_le_bytes());
    b[8..12].copy_from_slice(&payload_len.to_le_bytes());
}

/// Little-endian reader with typed too-short errors.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.b.get(self.at..self.at + N).ok_or_else(|| {
            Error::Protocol(format!(
                "header too short: need {} bytes, have {}",
                self.at + N,
                self.b.len()
            ))
        })?;
        self.at += N;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    /// A reserved field: must be zero.
    fn zero<const N: usize>(&mut self, what: &str) -> Result<()> {
        if self.take::<N>()? != [0u8; N] {
            return Err(Error::Protocol(format!("nonzero reserved bytes in {what}")));
        }
        Ok(())
    }
}

/// The wire version the peer of `b` speaks when it is a tcpx-rs peer of
/// another version (magic right, version not ours).
pub fn foreign_version(b: &[u8]) -> Option<u8> {
    (b.len() > 4 && b[0..4] == MAGIC.to_le_bytes() && b[4] != VERSION).then(|| b[4])
}

/// Checks magic, version, kind and header length of the first 12 bytes.
pub fn decode_prefix(b: &[u8]) -> Result<Prefix> {
    let mut r = Reader::new(b);
    let magic = r.u32()?;
    if magic != MAGIC {
        return Err(Error::Protocol(format!(
            "bad magic {magic:#010x}: not a tcpx-rs peer"
        )));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(Error::Protocol(format!(
            "peer speaks wire version {version}, we speak {VERSION}; use the same tcpx-rs release on both sides"
        )));
    }
    let kind_raw = r.u8()?;
    let kind = Kind::from_u8(kind_raw)
        .ok_or_else(|| Error::Protocol(format!("unknown header kind {kind_raw}")))?;
    let header_len = r.u16()? as usize;
    if header_len != kind.header_len() {
        return Err(Error::Protocol(format!(
            "{kind:?} header length {header_len}, expected {}",
            kind.header_len()
        )));
    }
    Ok(Prefix {
        kind,
        payload_len: r.u32()?,
    })
}

/// The prefix of `b`, which must be a whole header of `kind`; a reader after the prefix.
fn expect(b: &[u8], kind: Kind) -> Result<(Prefix, Reader<'_>)> {
    let p = decode_prefix(b)?;
    if p.kind != kind {
        return Err(Error::Protocol(format!(
            "expected a {kind:?} header, got {:?}",
            p.kind
        )));
    }
    if b.len() < kind.header_len() {
        return Err(Error::Protocol(format!(
            "{kind:?} header truncated at {} bytes",
            b.len()
        )));
    }
    Ok((p, Reader::new(&b[PREFIX_LEN..kind.header_len()])))
}

fn no_payload(p: Prefix, kind: Kind) -> Result<()> {
    if p.payload_len != 0 {
        return Err(Error::Protocol(format!("{kind:?} carries no payload")));
    }
    Ok(())
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        put_prefix(&mut b, Kind::Hello, 0);
        b[12..28].copy_from_slice(&self.secret);
        b[28..36].copy_from_slice(&self.comm_id.to_le_bytes());
        let (role, index) = match self.role {
            Role::Control => (0u8, 0u16),
            Role::Data { index } => (1, index),
        };
        b[36] = role;
        b[38..40].copy_from_slice(&index.to_le_bytes());
        b[40..42].copy_from_slice(&self.n_data.to_le_bytes());
        b[44..48].copy_from_slice(&self.inline_threshold.to_le_bytes());
        b[48..52].copy_from_slice(&self.peer_timeout_ms.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Hello)?;
        no_payload(p, Kind::Hello)?;
        let secret = r.take::<16>()?;
        let comm_id = r.u64()?;
        let role = r.u8()?;
        r.zero::<1>("Hello")?;
        let index = r.u16()?;
        let n_data = r.u16()?;
        r.zero::<2>("Hello")?;
        let inline_threshold = r.u32()?;
        let peer_timeout_ms = r.u32()?;
        let role = match role {
            0 => Role::Control,
            1 => Role::Data { index },
            x => return Err(Error::Protocol(format!("unknown socket role {x}"))),
        };
        if inline_threshold as usize > crate::config::MAX_INLINE {
            return Err(Error::Protocol(format!(
                "inline threshold {inline_threshold} above {}",
                crate::config::MAX_INLINE
            )));
        }
        Ok(Hello {
            secret,
            comm_id,
            role,
            n_data,
            inline_threshold,
            peer_timeout_ms,
        })
    }
}

impl Welcome {
    /// The header alone, announcing `n_nics` addresses.
    pub fn encode_header(&self) -> [u8; WELCOME_LEN] {
        let mut b = [0u8; WELCOME_LEN];
        put_prefix(&mut b, Kind::Welcome, self.n_nics as u32 * ADDR_LEN as u32);
        b[12..20].copy_from_slice(&self.comm_id.to_le_bytes());
        b[20..22].copy_from_slice(&self.n_nics.to_le_bytes());
        b[22..24].copy_from_slice(&self.inline_kib.to_le_bytes());
        b[24..28].copy_from_slice(&self.peer_timeout_ms.to_le_bytes());
        b
    }

    /// Header and payload (the NIC addresses, which set `n_nics`) in one buffer.
    pub fn encode(&self, nics: &[SocketAddr]) -> Vec<u8> {
        let head = Welcome {
            n_nics: nics.len() as u16,
            ..*self
        }
        .encode_header();
        let mut b = head.to_vec();
        b.resize(WELCOME_LEN + nics.len() * ADDR_LEN, 0);
        for (i, a) in nics.iter().enumerate() {
            let at = WELCOME_LEN + i * ADDR_LEN;
            put_addr(&mut b[at..at + ADDR_LEN], a);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Welcome)?;
        let comm_id = r.u64()?;
        let n_nics = r.u16()?;
        let inline_kib = match r.u16()? {
            0 => MIN_INLINE_KIB,
            k => k,
        };
        let peer_timeout_ms = r.u32()?;
        if n_nics == 0 || n_nics as usize > crate::config::MAX_NICS {
            return Err(Error::Protocol(format!("Welcome lists {n_nics} NICs")));
        }
        if !(MIN_INLINE_KIB..=MAX_INLINE_KIB).contains(&inline_kib) {
            return Err(Error::Protocol(format!(
                "Welcome accepts inline messages up to {inline_kib} KiB, not {MIN_INLINE_KIB}..={MAX_INLINE_KIB}"
            )));
        }
        if p.payload_len as usize != n_nics as usize * ADDR_LEN {
            return Err(Error::Protocol(format!(
                "Welcome payload {} bytes for {n_nics} NICs",
                p.payload_len
            )));
        }
        Ok(Welcome {
            comm_id,
            n_nics,
            inline_kib,
            peer_timeout_ms,
        })
    }

    pub fn decode_addrs(payload: &[u8]) -> Result<Vec<SocketAddr>> {
        if payload.len() % ADDR_LEN != 0 {
            return Err(Error::Protocol(
                "Welcome payload is not a list of addresses".into(),
            ));
        }
        payload.chunks_exact(ADDR_LEN).map(get_addr).collect()
    }
}

impl Msg {
    pub fn encode(&self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        let payload = if self.is_inline() {
            self.size as u32
        } else {
            0
        };
        put_prefix(&mut b, Kind::Msg, payload);
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.size.to_le_bytes());
        b[28..32].copy_from_slice(&self.tag.to_le_bytes());
        b[32..36].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[38..40].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Msg)?;
        let seq = r.u64()?;
        let size = r.u64()?;
        let tag = r.u32()? as i32;
        let chunk_size = r.u32()?;
        r.zero::<2>("Msg")?;
        let flags = r.u16()?;
        let m = Msg {
            seq,
            size,
            tag,
            chunk_size,
            flags,
        };
        if m.flags & !MSG_INLINE != 0 {
            return Err(Error::Protocol(format!(
                "unknown message flags {:#x}",
                m.flags
            )));
        }
        if m.is_inline() {
            if m.size > crate::config::MAX_INLINE_IDLE as u64 || p.payload_len as u64 != m.size {
                return Err(Error::Protocol(format!(
                    "inline message of {} bytes with payload length {}",
                    m.size, p.payload_len
                )));
            }
        } else if p.payload_len != 0 || m.chunk_size == 0 || m.size == 0 {
            return Err(Error::Protocol(
                "chunked message with inline payload, zero chunk size or zero size".into(),
            ));
        }
        Ok(m)
    }
}

impl Chunk {
    pub fn encode(&self) -> [u8; CHUNK_LEN] {
        let mut b = [0u8; CHUNK_LEN];
        put_prefix(&mut b, Kind::Chunk, self.len);
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Chunk)?;
        let seq = r.u64()?;
        let offset = r.u64()?;
        r.zero::<4>("Chunk")?;
        Ok(Chunk {
            seq,
            offset,
            len: p.payload_len,
        })
    }
}

impl Post {
    /// Header and payload (the buffers) in one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        Self::encode_into(self.post_seq, &self.bufs, &mut b);
        b
    }

    /// [`Post::encode`] appended to `out`, from borrowed buffers (a
    /// receive's post allocates nothing).
    pub fn encode_into(post_seq: u64, bufs: &[(u64, i32)], out: &mut Vec<u8>) {
        let n = bufs.len();
        let start = out.len();
        out.resize(start + POST_LEN + n * POST_BUF_LEN, 0);
        let b = &mut out[start..];
        put_prefix(b, Kind::Post, (n * POST_BUF_LEN) as u32);
        b[12..20].copy_from_slice(&post_seq.to_le_bytes());
        b[20..22].copy_from_slice(&(n as u16).to_le_bytes());
        for (i, (len, tag)) in bufs.iter().enumerate() {
            let at = POST_LEN + i * POST_BUF_LEN;
            b[at..at + 8].copy_from_slice(&len.to_le_bytes());
            b[at + 8..at + 12].copy_from_slice(&tag.to_le_bytes());
        }
    }

    /// Number of buffers the header announces (its payload is `n * POST_BUF_LEN`).
    pub fn decode_header(b: &[u8]) -> Result<(u64, usize)> {
        let (p, mut r) = expect(b, Kind::Post)?;
        let post_seq = r.u64()?;
        let n = r.u16()? as usize;
        r.zero::<6>("Post")?;
        if n == 0 || n > MAX_POST_BUFS || p.payload_len as usize != n * POST_BUF_LEN {
            return Err(Error::Protocol(format!(
                "Post of {n} buffers with payload length {}",
                p.payload_len
            )));
        }
        Ok((post_seq, n))
    }

    /// Header and payload from one buffer.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let (post_seq, n) = Self::decode_header(b)?;
        let payload = b
            .get(POST_LEN..POST_LEN + n * POST_BUF_LEN)
            .ok_or_else(|| Error::Protocol("Post payload truncated".into()))?;
        let bufs = payload
            .chunks_exact(POST_BUF_LEN)
            .map(|c| {
                let mut r = Reader::new(c);
                Ok((r.u64()?, r.u32()? as i32))
            })
            .collect::<Result<_>>()?;
        Ok(Post { post_seq, bufs })
    }
}

impl Ack {
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        put_prefix(&mut b, Kind::Ack, 0);
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Ack)?;
        no_payload(p, Kind::Ack)?;
        Ok(Ack { seq: r.u64()? })
    }
}

impl Ping {
    pub fn encode(&self) -> [u8; PING_LEN] {
        let mut b = [0u8; PING_LEN];
        put_prefix(&mut b, Kind::Ping, 0);
        b[12..20].copy_from_slice(&self.count.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Ping)?;
        no_payload(p, Kind::Ping)?;
        Ok(Ping { count: r.u64()? })
    }
}

impl Reject {
    pub fn encode(&self) -> [u8; REJECT_LEN] {
        let mut b = [0u8; REJECT_LEN];
        put_prefix(&mut b, Kind::Reject, 0);
        b[12..14].copy_from_slice(&self.reason.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Reject)?;
        no_payload(p, Kind::Reject)?;
        let reason = r.u16()?;
        r.zero::<6>("Reject")?;
        Ok(Reject { reason })
    }
}

impl Bye {
    pub fn encode(&self) -> [u8; BYE_LEN] {
        let mut b = [0u8; BYE_LEN];
        put_prefix(&mut b, Kind::Bye, 0);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Bye)?;
        no_payload(p, Kind::Bye)?;
        r.zero::<8>("Bye")?;
        Ok(Bye)
    }
}

impl Retire {
    pub fn encode(&self) -> [u8; RETIRE_LEN] {
        let mut b = [0u8; RETIRE_LEN];
        put_prefix(&mut b, Kind::Retire, 0);
        b[12..14].copy_from_slice(&self.index.to_le_bytes());
        b[16..20].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Retire)?;
        no_payload(p, Kind::Retire)?;
        let index = r.u16()?;
        r.zero::<2>("Retire")?;
        Ok(Retire {
            index,
            generation: r.u32()?,
        })
    }
}

impl Placed {
    /// Header and payload (the bitmap) in one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PLACED_LEN + self.bits.len()];
        put_prefix(&mut b, Kind::Placed, self.bits.len() as u32);
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.first.to_le_bytes());
        b[PLACED_LEN..].copy_from_slice(&self.bits);
        b
    }

    /// Header and payload from one buffer.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Placed)?;
        let seq = r.u64()?;
        let first = r.u64()?;
        r.zero::<4>("Placed")?;
        let n = p.payload_len as usize;
        if n == 0 || n > MAX_PLACED_BYTES || first % 8 != 0 {
            return Err(Error::Protocol(format!(
                "Placed of {n} bitmap bytes from chunk {first}"
            )));
        }
        let bits = b
            .get(PLACED_LEN..PLACED_LEN + n)
            .ok_or_else(|| Error::Protocol("Placed bitmap truncated".into()))?
            .to_vec();
        Ok(Placed { seq, first, bits })
    }
}

impl Dial {
    /// Header and payload (the address) in one buffer.
    pub fn encode(&self) -> [u8; DIAL_LEN + ADDR_LEN] {
        let mut b = [0u8; DIAL_LEN + ADDR_LEN];
        put_prefix(&mut b, Kind::Dial, ADDR_LEN as u32);
        b[12..14].copy_from_slice(&self.index.to_le_bytes());
        b[16..20].copy_from_slice(&self.generation.to_le_bytes());
        b[20..36].copy_from_slice(&self.token);
        put_addr(&mut b[DIAL_LEN..], &self.addr);
        b
    }

    /// Header and payload from one buffer.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let (p, mut r) = expect(b, Kind::Dial)?;
        let index = r.u16()?;
        r.zero::<2>("Dial")?;
        let generation = r.u32()?;
        let token = r.take::<16>()?;
        if p.payload_len as usize != ADDR_LEN {
            return Err(Error::Protocol(format!(
                "Dial payload of {} bytes (an address is {ADDR_LEN})",
                p.payload_len
            )));
        }
        let at = b
            .get(DIAL_LEN..DIAL_LEN + ADDR_LEN)
            .ok_or_else(|| Error::Protocol("Dial address truncated".into()))?;
        Ok(Dial {
            index,
            generation,
            token,
            addr: get_addr(at)?,
        })
    }
}

/// `family u8 | 0 u8 | port u16 | addr [16]` (IPv4 in the first 4 bytes).
pub fn put_addr(b: &mut [u8], a: &SocketAddr) {
    b[..ADDR_LEN].fill(0);
    match a.ip() {
        IpAddr::V4(ip) => {
            b[0] = 4;
            b[4..8].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            b[0] = 6;
            b[4..20].copy_from_slice(&ip.octets());
        }
    }
    b[2..4].copy_from_slice(&a.port().to_le_bytes());
}

pub fn get_addr(b: &[u8]) -> Result<SocketAddr> {
    let mut r = Reader::new(b);
    let family = r.u8()?;
    r.zero::<1>("an address")?;
    let port = r.u16()?;
    let raw = r.take::<16>()?;
    if port == 0 {
        return Err(Error::Protocol("address with port 0".into()));
    }
    let ip = match family {
        4 => {
            if raw[4..].iter().any(|&x| x != 0) {
                return Err(Error::Protocol("IPv4 address with trailing bytes".into()));
            }
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        }
        6 => IpAddr::V6(Ipv6Addr::from(raw)),
        f => return Err(Error::Protocol(format!("unknown address family {f}"))),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Any header, as the fuzz target and property tests see the parsers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    Hello(Hello),
    Welcome(Welcome),
    Msg(Msg),
    Chunk(Chunk),
    Post(Post),
    Ack(Ack),
    Ping(Ping),
    Reject(Reject),
    Retire(Retire),
    Placed(Placed),
    Dial(Dial),
    Bye(Bye),
}

impl Header {
    /// The header's bytes (with a Post's buffers; a Welcome without addresses).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Header::Hello(h) => h.encode().to_vec(),
            Header::Welcome(w) => w.encode_header().to_vec(),
            Header::Msg(m) => m.encode().to_vec(),
            Header::Chunk(c) => c.encode().to_vec(),
            Header::Post(p) => p.encode(),
            Header::Ack(a) => a.encode().to_vec(),
            Header::Ping(p) => p.encode().to_vec(),
            Header::Reject(r) => r.encode().to_vec(),
            Header::Retire(r) => r.encode().to_vec(),
            Header::Placed(p) => p.encode(),
            Header::Dial(d) => d.encode().to_vec(),
            Header::Bye(b) => b.encode().to_vec(),
        }
    }
}

/// Parses one header of any kind from the front of `b` (a Post, Placed or
/// Dial with its payload).
pub fn parse_header(b: &[u8]) -> Result<Header> {
    let p = decode_prefix(b)?;
    Ok(match p.kind {
        Kind::Hello => Header::Hello(Hello::decode(b)?),
        Kind::Welcome => Header::Welcome(Welcome::decode(b)?),
        Kind::Msg => Header::Msg(Msg::decode(b)?),
        Kind::Chunk => Header::Chunk(Chunk::decode(b)?),
        Kind::Post => Header::Post(Post::decode(b)?),
        Kind::Ack => Header::Ack(Ack::decode(b)?),
        Kind::Ping => Header::Ping(Ping::decode(b)?),
        Kind::Reject => Header::Reject(Reject::decode(b)?),
        Kind::Retire => Header::Retire(Retire::decode(b)?),
        Kind::Placed => Header::Placed(Placed::decode(b)?),
        Kind::Dial => Header::Dial(Dial::decode(b)?),
        Kind::Bye => Header::Bye(Bye::decode(b)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn msg_golden_bytes() {
        let m = Msg {
            seq: 7,
            size: 5,
            tag: -2,
            chunk_size: 0x80000,
            flags: MSG_INLINE,
        };
        let b = m.encode();
        assert_eq!(&b[..12], &[b'T', b'C', b'P', b'X', 2, 3, 40, 0, 5, 0, 0, 0]);
        assert_eq!(&b[12..20], &7u64.to_le_bytes());
        assert_eq!(&b[28..32], &[0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(&b[36..40], &[0, 0, 1, 0]);
        assert_eq!(Msg::decode(&b).unwrap(), m);
    }

    #[test]
    fn post_ack_ping_golden_bytes() {
        let p = Post {
            post_seq: 3,
            bufs: vec![(0x10_0001, 1), (10, -1)],
        };
        let b = p.encode();
        assert_eq!(
            &b[..12],
            &[b'T', b'C', b'P', b'X', 2, 5, 28, 0, 24, 0, 0, 0]
        );
        assert_eq!(&b[12..20], &3u64.to_le_bytes());
        assert_eq!(&b[20..28], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[28..36], &0x10_0001u64.to_le_bytes());
        assert_eq!(&b[36..40], &1i32.to_le_bytes());
        assert_eq!(&b[48..52], &[0xff; 4]);
        assert_eq!(Post::decode(&b).unwrap(), p);
        let a = Ack { seq: 9 }.encode();
        assert_eq!(&a[..12], &[b'T', b'C', b'P', b'X', 2, 6, 20, 0, 0, 0, 0, 0]);
        assert_eq!(&a[12..], &9u64.to_le_bytes());
        let g = Ping { count: 1 }.encode();
        assert_eq!(&g[..8], &[b'T', b'C', b'P', b'X', 2, 7, 20, 0]);
        let y = Bye.encode();
        assert_eq!(&y[..12], &[b'T', b'C', b'P', b'X', 2, 9, 20, 0, 0, 0, 0, 0]);
        assert_eq!(&y[12..], &[0; 8]);
    }

    #[test]
    fn retire_placed_dial_golden_bytes() {
        let r = Retire {
            index: 3,
            generation: 0x0102_0304,
        }
        .encode();
        assert_eq!(
            &r[..12],
            &[b'T', b'C', b'P', b'X', 2, 10, 20, 0, 0, 0, 0, 0]
        );
        assert_eq!(&r[12..], &[3, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(
            Retire::decode(&r).unwrap(),
            Retire {
                index: 3,
                generation: 0x0102_0304
            }
        );
        let p = Placed {
            seq: 5,
            first: 16,
            bits: vec![0b1010_0001, 0xff],
        };
        let b = p.encode();
        assert_eq!(
            &b[..12],
            &[b'T', b'C', b'P', b'X', 2, 11, 32, 0, 2, 0, 0, 0]
        );
        assert_eq!(&b[12..20], &5u64.to_le_bytes());
        assert_eq!(&b[20..28], &16u64.to_le_bytes());
        assert_eq!(&b[28..32], &[0; 4]);
        assert_eq!(&b[32..], &[0b1010_0001, 0xff]);
        assert_eq!(Placed::decode(&b).unwrap(), p);
        let d = Dial {
            index: 1,
            generation: 2,
            token: [7; 16],
            addr: "10.0.0.2:4000".parse().unwrap(),
        };
        let b = d.encode();
        assert_eq!(b.len(), 36 + 20);
        assert_eq!(
            &b[..12],
            &[b'T', b'C', b'P', b'X', 2, 12, 36, 0, 20, 0, 0, 0]
        );
        assert_eq!(&b[12..20], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&b[20..36], &[7; 16]);
        assert_eq!(&b[36..40], &[4, 0, 0xa0, 0x0f]);
        assert_eq!(&b[40..44], &[10, 0, 0, 2]);
        assert_eq!(Dial::decode(&b).unwrap(), d);
    }

    #[test]
    fn placed_bitmaps_are_bounded_and_aligned() {
        for (first, n) in [(0u64, 0usize), (3, 1), (0, MAX_PLACED_BYTES + 1)] {
            let mut b = Placed {
                seq: 0,
                first: 0,
                bits: vec![1; n.max(1)],
            }
            .encode();
            b[20..28].copy_from_slice(&first.to_le_bytes());
            b.resize(PLACED_LEN + n, 0);
            b[8..12].copy_from_slice(&(n as u32).to_le_bytes());
            assert!(Placed::decode(&b).is_err(), "{first} {n}");
        }
        let mut d = Dial {
            index: 0,
            generation: 0,
            token: [0; 16],
            addr: "10.0.0.2:1".parse().unwrap(),
        }
        .encode();
        d[8] = 21;
        assert!(Dial::decode(&d).is_err(), "a Dial carries one address");
    }

    #[test]
    fn hello_and_welcome_layouts() {
        let h = Hello {
            secret: [9; 16],
            comm_id: 0,
            role: Role::Control,
            n_data: 4,
            inline_threshold: 65536,
            peer_timeout_ms: 2000,
        };
        let b = h.encode();
        assert_eq!(b.len(), 52);
        assert_eq!(&b[44..48], &65536u32.to_le_bytes());
        assert_eq!(&b[48..52], &2000u32.to_le_bytes());
        let w = Welcome {
            comm_id: 5,
            n_nics: 1,
            inline_kib: 200,
            peer_timeout_ms: 7,
        };
        let addr: SocketAddr = "10.0.0.1:99".parse().unwrap();
        let mut wb = w.encode(&[addr]);
        assert_eq!(wb.len(), 28 + 20, "Welcome is 28 bytes plus 20 per NIC");
        assert_eq!(&wb[22..24], &200u16.to_le_bytes());
        assert_eq!(&wb[24..28], &7u32.to_le_bytes());
        assert_eq!(Welcome::decode(&wb).unwrap(), w);
        // A receiver that announces nothing accepts what every one does.
        wb[22..24].fill(0);
        assert_eq!(Welcome::decode(&wb).unwrap().inline_kib, 64);
        for kib in [1u16, 63, 257, u16::MAX] {
            wb[22..24].copy_from_slice(&kib.to_le_bytes());
            let e = Welcome::decode(&wb).unwrap_err().to_string();
            assert!(e.contains("inline messages up to"), "{e}");
        }
    }

    #[test]
    fn a_v1_peer_is_told_apart() {
        let mut b = Ack { seq: 1 }.encode();
        b[4] = 1;
        assert_eq!(foreign_version(&b), Some(1));
        let e = decode_prefix(&b).unwrap_err().to_string();
        assert!(e.contains("wire version 1, we speak 2"), "{e}");
        assert_eq!(foreign_version(&Ack { seq: 1 }.encode()), None);
        assert_eq!(foreign_version(b"XXXX\x01"), None);
    }

    #[test]
    fn corrupt_prefixes_and_reserved_bytes_are_rejected() {
        let good = Chunk {
            seq: 1,
            offset: 2,
            len: 3,
        }
        .encode();
        for (i, v) in [(0usize, b'X'), (4, 1), (5, 9), (6, 33), (28, 1)] {
            let mut b = good;
            b[i] = v;
            assert!(
                matches!(parse_header(&b), Err(Error::Protocol(_))),
                "byte {i}"
            );
        }
        assert!(parse_header(&good[..20]).is_err());
        let mut m = Msg {
            seq: 0,
            size: 100,
            tag: 0,
            chunk_size: 4096,
            flags: 0,
        }
        .encode();
        m[36] = 1;
        assert!(Msg::decode(&m).is_err(), "reserved bytes of Msg");
        let zero = Msg {
            seq: 0,
            size: 0,
            tag: 0,
            chunk_size: 4096,
            flags: 0,
        }
        .encode();
        assert!(Msg::decode(&zero).is_err(), "a chunked message of 0 bytes");
    }

    #[test]
    fn posts_name_one_to_eight_buffers() {
        for n in [0usize, 9] {
            let mut b = Post {
                post_seq: 0,
                bufs: vec![(1, 1); n.max(1)],
            }
            .encode();
            b[20..22].copy_from_slice(&(n as u16).to_le_bytes());
            b[8..12].copy_from_slice(&((n * POST_BUF_LEN) as u32).to_le_bytes());
            assert!(Post::decode_header(&b).is_err(), "{n} buffers");
        }
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1u16..).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
            (any::<[u8; 16]>(), 1u16..).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
        ]
    }

    fn any_header() -> impl Strategy<Value = Header> {
        prop_oneof![
            (
                any::<[u8; 16]>(),
                any::<u64>(),
                any::<bool>(),
                any::<u16>(),
                any::<u16>(),
                0u32..=65536,
                any::<u32>()
            )
                .prop_map(|(secret, comm_id, data, index, n_data, inl, to)| {
                    Header::Hello(Hello {
                        secret,
                        comm_id,
                        role: if data {
                            Role::Data { index }
                        } else {
                            Role::Control
                        },
                        n_data,
                        inline_threshold: inl,
                        peer_timeout_ms: to,
                    })
                }),
            (any::<u64>(), 1u64.., any::<i32>(), 1u32..).prop_map(|(seq, size, tag, cs)| {
                Header::Msg(Msg {
                    seq,
                    size,
                    tag,
                    chunk_size: cs,
                    flags: 0,
                })
            }),
            (any::<u64>(), 0u64..=65536, any::<i32>()).prop_map(|(seq, size, tag)| {
                Header::Msg(Msg {
                    seq,
                    size,
                    tag,
                    chunk_size: 0,
                    flags: MSG_INLINE,
                })
            }),
            (any::<u64>(), any::<u64>(), any::<u32>())
                .prop_map(|(seq, offset, len)| Header::Chunk(Chunk { seq, offset, len })),
            (
                any::<u64>(),
                proptest::collection::vec((any::<u64>(), any::<i32>()), 1..=8)
            )
                .prop_map(|(post_seq, bufs)| Header::Post(Post { post_seq, bufs })),
            any::<u64>().prop_map(|seq| Header::Ack(Ack { seq })),
            any::<u64>().prop_map(|count| Header::Ping(Ping { count })),
            any::<u16>().prop_map(|reason| Header::Reject(Reject { reason })),
            (any::<u16>(), any::<u32>())
                .prop_map(|(index, generation)| Header::Retire(Retire { index, generation })),
            (
                any::<u64>(),
                0u64..(1 << 40),
                proptest::collection::vec(any::<u8>(), 1..=64)
            )
                .prop_map(|(seq, f, bits)| Header::Placed(Placed {
                    seq,
                    first: f * 8,
                    bits
                })),
            (any::<u16>(), any::<u32>(), any::<[u8; 16]>(), addr()).prop_map(
                |(index, generation, token, addr)| Header::Dial(Dial {
                    index,
                    generation,
                    token,
                    addr
                })
            ),
            Just(Header::Bye(Bye)),
            (
                any::<u64>(),
                1u16..=16,
                MIN_INLINE_KIB..=MAX_INLINE_KIB,
                any::<u32>()
            )
                .prop_map(|(comm_id, n_nics, inline_kib, to)| {
                    Header::Welcome(Welcome {
                        comm_id,
                        n_nics,
                        inline_kib,
                        peer_timeout_ms: to,
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_header(&b);
            let _ = get_addr(&b);
            let _ = Welcome::decode_addrs(&b);
            let _ = Post::decode_header(&b);
            let _ = foreign_version(&b);
        }

        #[test]
        fn every_header_round_trips(h in any_header()) {
            prop_assert_eq!(parse_header(&h.encode()).unwrap(), h);
        }

        #[test]
        fn mutated_headers_never_panic_and_reencode(h in any_header(), i in 0usize..128, v: u8) {
            let mut b = h.encode();
            let at = i % b.len();
            b[at] = v;
            if let Ok(parsed) = parse_header(&b) {
                // Whatever parses is a header that encodes to the same fields.
                prop_assert_eq!(parse_header(&parsed.encode()).unwrap(), parsed);
            }
        }

        #[test]
        fn welcome_round_trips(
            comm_id: u64,
            to: u32,
            inline_kib in MIN_INLINE_KIB..=MAX_INLINE_KIB,
            nics in proptest::collection::vec(addr(), 1..16),
        ) {
            let w = Welcome { comm_id, n_nics: nics.len() as u16, inline_kib, peer_timeout_ms: to };
            let b = w.encode(&nics);
            prop_assert_eq!(Welcome::decode(&b).unwrap(), w);
            prop_assert_eq!(Welcome::decode_addrs(&b[WELCOME_LEN..]).unwrap(), nics);
        }
    }
}
