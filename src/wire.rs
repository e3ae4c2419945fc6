//! The peer wire protocol (docs/PROTOCOL.md), sans I/O: byte layouts in,
//! typed headers out. Parsers never panic on hostile input.
//!
//! Every header starts with the same 12-byte prefix:
//! `magic u32 | version u8 | kind u8 | header_len u16 | payload_len u32`
//! (little-endian), checked on receipt.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::{Error, Result};

pub const MAGIC: u32 = u32::from_le_bytes(*b"TCPX");
pub const VERSION: u8 = 1;
pub const PREFIX_LEN: usize = 12;
pub const HELLO_LEN: usize = 48;
pub const WELCOME_LEN: usize = 24;
pub const MSG_LEN: usize = 40;
pub const CHUNK_LEN: usize = 32;
/// One NIC address in a Welcome payload.
pub const ADDR_LEN: usize = 20;
/// Largest header of any kind: the size of a receive buffer for one header.
pub const MAX_HEADER_LEN: usize = HELLO_LEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Msg = 3,
    Chunk = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Msg,
            4 => Kind::Chunk,
            _ => return None,
        })
    }
    pub fn header_len(self) -> usize {
        match self {
            Kind::Hello => HELLO_LEN,
            Kind::Welcome => WELCOME_LEN,
            Kind::Msg => MSG_LEN,
            Kind::Chunk => CHUNK_LEN,
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
}

/// Server's answer on the control socket; `n_nics` addresses follow as payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub comm_id: u64,
    pub n_nics: u16,
}

pub const MSG_INLINE: u16 = 1;

/// One message announced on the control socket, sender to receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    pub seq: u64,
    pub size: u64,
    pub tag: i32,
    pub chunk_size: u32,
    /// Data socket that carries chunk 0; chunk k goes to `(first_socket + k) % n_sockets`.
    pub first_socket: u16,
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

fn expect(b: &[u8], kind: Kind) -> Result<Prefix> {
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
    Ok(p)
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
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let p = expect(b, Kind::Hello)?;
        if p.payload_len != 0 {
            return Err(Error::Protocol("Hello carries no payload".into()));
        }
        let mut r = Reader::new(&b[PREFIX_LEN..]);
        let secret = r.take::<16>()?;
        let comm_id = r.u64()?;
        let role = r.u8()?;
        let _pad = r.u8()?;
        let index = r.u16()?;
        let n_data = r.u16()?;
        let role = match role {
            0 => Role::Control,
            1 => Role::Data { index },
            x => return Err(Error::Protocol(format!("unknown socket role {x}"))),
        };
        Ok(Hello {
            secret,
            comm_id,
            role,
            n_data,
        })
    }
}

impl Welcome {
    /// Header and payload (the NIC addresses) in one buffer.
    pub fn encode(comm_id: u64, nics: &[SocketAddr]) -> Vec<u8> {
        let mut b = vec![0u8; WELCOME_LEN + nics.len() * ADDR_LEN];
        put_prefix(&mut b, Kind::Welcome, (nics.len() * ADDR_LEN) as u32);
        b[12..20].copy_from_slice(&comm_id.to_le_bytes());
        b[20..22].copy_from_slice(&(nics.len() as u16).to_le_bytes());
        for (i, a) in nics.iter().enumerate() {
            let at = WELCOME_LEN + i * ADDR_LEN;
            put_addr(&mut b[at..at + ADDR_LEN], a);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let p = expect(b, Kind::Welcome)?;
        let mut r = Reader::new(&b[PREFIX_LEN..]);
        let comm_id = r.u64()?;
        let n_nics = r.u16()?;
        if n_nics == 0 || n_nics as usize > crate::config::MAX_NICS {
            return Err(Error::Protocol(format!("Welcome lists {n_nics} NICs")));
        }
        if p.payload_len as usize != n_nics as usize * ADDR_LEN {
            return Err(Error::Protocol(format!(
                "Welcome payload {} bytes for {n_nics} NICs",
                p.payload_len
            )));
        }
        Ok(Welcome { comm_id, n_nics })
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
        b[36..38].copy_from_slice(&self.first_socket.to_le_bytes());
        b[38..40].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let p = expect(b, Kind::Msg)?;
        let mut r = Reader::new(&b[PREFIX_LEN..]);
        let m = Msg {
            seq: r.u64()?,
            size: r.u64()?,
            tag: r.u32()? as i32,
            chunk_size: r.u32()?,
            first_socket: r.u16()?,
            flags: r.u16()?,
        };
        if m.flags & !MSG_INLINE != 0 {
            return Err(Error::Protocol(format!(
                "unknown message flags {:#x}",
                m.flags
            )));
        }
        if m.is_inline() {
            if m.size > crate::config::MAX_INLINE as u64 || p.payload_len as u64 != m.size {
                return Err(Error::Protocol(format!(
                    "inline message of {} bytes with payload length {}",
                    m.size, p.payload_len
                )));
            }
        } else if p.payload_len != 0 || m.chunk_size == 0 {
            return Err(Error::Protocol(
                "chunked message with inline payload or zero chunk size".into(),
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
        let p = expect(b, Kind::Chunk)?;
        let mut r = Reader::new(&b[PREFIX_LEN..]);
        Ok(Chunk {
            seq: r.u64()?,
            offset: r.u64()?,
            len: p.payload_len,
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
    if r.u8()? != 0 {
        return Err(Error::Protocol("nonzero padding in an address".into()));
    }
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
}

/// Parses one header of any kind from the front of `b`.
pub fn parse_header(b: &[u8]) -> Result<Header> {
    let p = decode_prefix(b)?;
    Ok(match p.kind {
        Kind::Hello => Header::Hello(Hello::decode(b)?),
        Kind::Welcome => Header::Welcome(Welcome::decode(b)?),
        Kind::Msg => Header::Msg(Msg::decode(b)?),
        Kind::Chunk => Header::Chunk(Chunk::decode(b)?),
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
            first_socket: 3,
            flags: MSG_INLINE,
        };
        let b = m.encode();
        assert_eq!(&b[..12], &[b'T', b'C', b'P', b'X', 1, 3, 40, 0, 5, 0, 0, 0]);
        assert_eq!(&b[12..20], &7u64.to_le_bytes());
        assert_eq!(&b[28..32], &[0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(Msg::decode(&b).unwrap(), m);
    }

    #[test]
    fn corrupt_prefixes_are_rejected() {
        let good = Chunk {
            seq: 1,
            offset: 2,
            len: 3,
        }
        .encode();
        for (i, v) in [(0usize, b'X'), (4, 2), (5, 9), (6, 33)] {
            let mut b = good;
            b[i] = v;
            assert!(
                matches!(parse_header(&b), Err(Error::Protocol(_))),
                "byte {i}"
            );
        }
        assert!(parse_header(&good[..20]).is_err());
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1u16..).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
            (any::<[u8; 16]>(), 1u16..).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
        ]
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_header(&b);
            let _ = get_addr(&b);
            let _ = Welcome::decode_addrs(&b);
        }

        #[test]
        fn mutated_headers_never_panic(i in 0usize..MSG_LEN, v: u8, seq: u64, size in 0u64..(1<<40)) {
            let mut b = Msg { seq, size, tag: 0, chunk_size: 4096, first_socket: 0, flags: 0 }.encode();
            b[i] = v;
            let _ = parse_header(&b);
        }

        #[test]
        fn hello_round_trips(secret: [u8; 16], comm_id: u64, data: bool, index: u16, n_data: u16) {
            let role = if data { Role::Data { index } } else { Role::Control };
            let h = Hello { secret, comm_id, role, n_data };
            prop_assert_eq!(parse_header(&h.encode()).unwrap(), Header::Hello(h));
        }

        #[test]
        fn msg_round_trips(seq: u64, size in 0u64..(1 << 40), tag: i32, chunk_size in 1u32.., first_socket: u16) {
            let m = Msg { seq, size, tag, chunk_size, first_socket, flags: 0 };
            prop_assert_eq!(parse_header(&m.encode()).unwrap(), Header::Msg(m));
            let small = Msg { size: size % (crate::config::MAX_INLINE as u64 + 1), flags: MSG_INLINE, ..m };
            prop_assert_eq!(parse_header(&small.encode()).unwrap(), Header::Msg(small));
        }

        #[test]
        fn chunk_round_trips(seq: u64, offset: u64, len: u32) {
            let c = Chunk { seq, offset, len };
            prop_assert_eq!(parse_header(&c.encode()).unwrap(), Header::Chunk(c));
        }

        #[test]
        fn welcome_round_trips(comm_id: u64, nics in proptest::collection::vec(addr(), 1..16)) {
            let b = Welcome::encode(comm_id, &nics);
            let w = Welcome::decode(&b).unwrap();
            prop_assert_eq!(w, Welcome { comm_id, n_nics: nics.len() as u16 });
            prop_assert_eq!(Welcome::decode_addrs(&b[WELCOME_LEN..]).unwrap(), nics);
        }
    }
}
