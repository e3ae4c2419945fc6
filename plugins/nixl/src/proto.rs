//! The request/response protocol between two TCPX NIXL engines (PROTOCOL.md).
//!
//! Sans-I/O: messages are encoded to and decoded from byte vectors here; the
//! link module moves them as tcpx messages with tag [`TAG_HDR`], and the
//! payloads of WRITE/READ as separate messages with tag [`TAG_DATA`].
//! Decoding never panics on hostile input: every read is bounds-checked.
#![forbid(unsafe_code)]

use crate::error::{Error, Result};

/// "TXNX", little-endian on the wire.
pub const MAGIC: u32 = 0x584e_5854;
/// 2: Write and Read carry a layout (packed descriptors).
pub const VERSION: u16 = 2;
/// magic u32, version u16, kind u8, flags u8, body length u32, reserved u32.
pub const HDR_LEN: usize = 16;
/// Receive buffer for one header message; every encoded message fits.
pub const MAX_MSG: usize = 256 * 1024;
/// Descriptors per WRITE/READ message; larger transfers are split into batches.
pub const MAX_DESCS: usize = 8192;
/// Largest pack: the bytes of several descriptors in one payload message.
pub const MAX_PACK: usize = 4 << 20;
/// Largest notification message (bytes).
pub const MAX_NOTIF: usize = 64 * 1024;
/// Largest agent name or error text on the wire.
pub const MAX_TEXT: usize = 4096;
/// tcpx tag of header messages.
pub const TAG_HDR: i32 = 0x4e58;
/// tcpx tag of payload messages.
pub const TAG_DATA: i32 = 0x4e59;

const K_HELLO: u8 = 1;
const K_HELLO_BACK: u8 = 2;
const K_WRITE: u8 = 3;
const K_WRITE_DONE: u8 = 4;
const K_READ: u8 = 5;
const K_READ_RESP: u8 = 6;
const K_NOTIF: u8 = 7;

const F_NOTIF: u8 = 1;

/// One remote range of a WRITE or READ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u64,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// First message on a comm opened by `agent`; the receiver connects back
    /// to `handle` and answers with `HelloBack` carrying the same `pair`.
    Hello {
        pair: u64,
        agent: String,
        handle: Vec<u8>,
    },
    HelloBack {
        pair: u64,
        agent: String,
    },
    /// Followed by one payload message per entry of `layout`, in order:
    /// entry `k` is how many consecutive descriptors message `k` carries
    /// (several: their bytes back to back, a pack of at most [`MAX_PACK`]).
    Write {
        id: u64,
        mem: u32,
        descs: Vec<Desc>,
        layout: Vec<u32>,
        notif: Option<Vec<u8>>,
    },
    /// Sent by the target after every payload of `id` is in place (status 0)
    /// or after draining the payloads of a refused request (status < 0).
    WriteDone {
        id: u64,
        status: i32,
        text: String,
    },
    /// The payloads of the answer follow `layout`, as a Write's do.
    Read {
        id: u64,
        mem: u32,
        descs: Vec<Desc>,
        layout: Vec<u32>,
    },
    /// Status 0: followed by the payload messages of the Read's layout.
    ReadResp {
        id: u64,
        status: i32,
        text: String,
    },
    /// A notification for the receiving agent's get-notifs queue.
    Notif {
        msg: Vec<u8>,
    },
}

struct W(Vec<u8>);

impl W {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

/// A cursor whose reads fail with a typed error instead of panicking.
struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| Error::Protocol(format!("message too short for {what}")))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }
    fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(self.u32(what)? as i32)
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self, max: usize, what: &str) -> Result<&'a [u8]> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(Error::Protocol(format!(
                "{what} of {n} bytes exceeds {max}"
            )));
        }
        self.take(n, what)
    }
    fn text(&mut self, what: &str) -> Result<String> {
        let b = self.bytes(MAX_TEXT, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::Protocol(format!("{what} is not UTF-8")))
    }
    /// A layout for `descs`: entries of at least 1 that add up to their
    /// count, packs within [`MAX_PACK`].
    fn layout(&mut self, descs: &[Desc]) -> Result<Vec<u32>> {
        let n = self.u32("layout length")? as usize;
        if n > descs.len() {
            return Err(Error::Protocol(format!(
                "a layout of {n} messages for {} descriptors",
                descs.len()
            )));
        }
        let layout = (0..n)
            .map(|_| self.u32("layout entry"))
            .collect::<Result<Vec<_>>>()?;
        let mut at = 0usize;
        for &k in &layout {
            let k = k as usize;
            let run = descs.get(at..at.saturating_add(k)).filter(|_| k > 0);
            let run = run.ok_or_else(|| {
                Error::Protocol(format!(
                    "layout entry {k} at descriptor {at} of {}",
                    descs.len()
                ))
            })?;
            if k > 1 {
                let bytes = run.iter().try_fold(0u64, |a, d| a.checked_add(d.len));
                if bytes.is_none_or(|b| b > MAX_PACK as u64) {
                    return Err(Error::Protocol(format!(
                        "a pack of {k} descriptors exceeds {MAX_PACK} bytes"
                    )));
                }
            }
            at += k;
        }
        if at != descs.len() {
            return Err(Error::Protocol(format!(
                "a layout of {at} descriptors for {}",
                descs.len()
            )));
        }
        Ok(layout)
    }

    fn descs(&mut self) -> Result<Vec<Desc>> {
        let n = self.u32("descriptor count")? as usize;
        if n > MAX_DESCS {
            return Err(Error::Protocol(format!(
                "{n} descriptors exceed {MAX_DESCS}"
            )));
        }
        (0..n)
            .map(|_| {
                Ok(Desc {
                    addr: self.u64("descriptor address")?,
                    len: self.u64("descriptor length")?,
                })
            })
            .collect()
    }
}

fn clip(s: &str) -> &str {
    let mut n = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

impl Msg {
    /// Encodes the message. The caller keeps descriptor lists within
    /// [`MAX_DESCS`] and notifications within [`MAX_NOTIF`].
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(Vec::with_capacity(64));
        let (kind, flags) = match self {
            Msg::Hello {
                pair,
                agent,
                handle,
            } => {
                w.u64(*pair);
                w.bytes(clip(agent).as_bytes());
                w.bytes(handle);
                (K_HELLO, 0)
            }
            Msg::HelloBack { pair, agent } => {
                w.u64(*pair);
                w.bytes(clip(agent).as_bytes());
                (K_HELLO_BACK, 0)
            }
            Msg::Write {
                id,
                mem,
                descs,
                layout,
                notif,
            } => {
                w.u64(*id);
                w.u32(*mem);
                put_descs(&mut w, descs);
                put_layout(&mut w, layout);
                w.bytes(notif.as_deref().unwrap_or_default());
                (K_WRITE, if notif.is_some() { F_NOTIF } else { 0 })
            }
            Msg::WriteDone { id, status, text } => {
                w.u64(*id);
                w.i32(*status);
                w.bytes(clip(text).as_bytes());
                (K_WRITE_DONE, 0)
            }
            Msg::Read {
                id,
                mem,
                descs,
                layout,
            } => {
                w.u64(*id);
                w.u32(*mem);
                put_descs(&mut w, descs);
                put_layout(&mut w, layout);
                (K_READ, 0)
            }
            Msg::ReadResp { id, status, text } => {
                w.u64(*id);
                w.i32(*status);
                w.bytes(clip(text).as_bytes());
                (K_READ_RESP, 0)
            }
            Msg::Notif { msg } => {
                w.bytes(msg);
                (K_NOTIF, 0)
            }
        };
        let body = w.0;
        let mut out = Vec::with_capacity(HDR_LEN + body.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes one message; the whole buffer must be that message.
    pub fn decode(buf: &[u8]) -> Result<Msg> {
        let mut r = R { b: buf, at: 0 };
        if r.u32("magic")? != MAGIC {
            return Err(Error::Protocol("bad magic (not a TCPX NIXL peer?)".into()));
        }
        let v = r.u16("version")?;
        if v != VERSION {
            return Err(Error::Protocol(format!(
                "peer speaks protocol version {v}, we speak {VERSION}; use the same plugin build on both sides"
            )));
        }
        let kind = r.u8("kind")?;
        let flags = r.u8("flags")?;
        let len = r.u32("body length")? as usize;
        r.u32("reserved")?;
        if buf.len() != HDR_LEN + len {
            return Err(Error::Protocol(format!(
                "body length {len} does not match the {}-byte message",
                buf.len()
            )));
        }
        let m = match kind {
            K_HELLO => Msg::Hello {
                pair: r.u64("pair id")?,
                agent: r.text("agent name")?,
                handle: r.bytes(MAX_TEXT, "listen handle")?.to_vec(),
            },
            K_HELLO_BACK => Msg::HelloBack {
                pair: r.u64("pair id")?,
                agent: r.text("agent name")?,
            },
            K_WRITE => {
                let id = r.u64("request id")?;
                let mem = r.u32("memory kind")?;
                let descs = r.descs()?;
                let layout = r.layout(&descs)?;
                let notif = r.bytes(MAX_NOTIF, "notification")?;
                Msg::Write {
                    id,
                    mem,
                    descs,
                    layout,
                    notif: (flags & F_NOTIF != 0).then(|| notif.to_vec()),
                }
            }
            K_WRITE_DONE => Msg::WriteDone {
                id: r.u64("request id")?,
                status: r.i32("status")?,
                text: r.text("error text")?,
            },
            K_READ => {
                let id = r.u64("request id")?;
                let mem = r.u32("memory kind")?;
                let descs = r.descs()?;
                let layout = r.layout(&descs)?;
                Msg::Read {
                    id,
                    mem,
                    descs,
                    layout,
                }
            }
            K_READ_RESP => Msg::ReadResp {
                id: r.u64("request id")?,
                status: r.i32("status")?,
                text: r.text("error text")?,
            },
            K_NOTIF => Msg::Notif {
                msg: r.bytes(MAX_NOTIF, "notification")?.to_vec(),
            },
            k => return Err(Error::Protocol(format!("unknown message kind {k}"))),
        };
        if r.at != buf.len() {
            return Err(Error::Protocol("trailing bytes after the message".into()));
        }
        Ok(m)
    }
}

impl Msg {
    /// The message's kind, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::HelloBack { .. } => "HelloBack",
            Msg::Write { .. } => "Write",
            Msg::WriteDone { .. } => "WriteDone",
            Msg::Read { .. } => "Read",
            Msg::ReadResp { .. } => "ReadResp",
            Msg::Notif { .. } => "Notif",
        }
    }
}

fn put_layout(w: &mut W, layout: &[u32]) {
    w.u32(layout.len() as u32);
    for &k in layout {
        w.u32(k);
    }
}

fn put_descs(w: &mut W, descs: &[Desc]) {
    w.u32(descs.len() as u32);
    for d in descs {
        w.u64(d.addr);
        w.u64(d.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello {
                pair: 7,
                agent: "A".into(),
                handle: vec![1; 128],
            },
            Msg::HelloBack {
                pair: 7,
                agent: "B".into(),
            },
            Msg::Write {
                id: 1,
                mem: 0,
                descs: vec![
                    Desc {
                        addr: 4096,
                        len: 10
                    };
                    3
                ],
                layout: vec![1, 2],
                notif: Some(b"n".to_vec()),
            },
            Msg::Write {
                id: 1,
                mem: 0,
                descs: vec![],
                layout: vec![],
                notif: Some(vec![]),
            },
            Msg::Write {
                id: 1,
                mem: 0,
                descs: vec![],
                layout: vec![],
                notif: None,
            },
            Msg::WriteDone {
                id: 2,
                status: -6,
                text: "no".into(),
            },
            Msg::Read {
                id: 3,
                mem: 0,
                descs: vec![Desc { addr: 1, len: 2 }],
                layout: vec![1],
            },
            Msg::ReadResp {
                id: 3,
                status: 0,
                text: String::new(),
            },
            Msg::Notif { msg: vec![0, 1, 2] },
            Msg::Read {
                id: 4,
                mem: 1,
                descs: vec![
                    Desc { addr: 0, len: 3 },
                    Desc { addr: 8, len: 8192 },
                    Desc { addr: 9000, len: 1 },
                ],
                layout: vec![3],
            },
        ]
    }

    /// The fuzz target's seeds (fuzz/seeds/nixl_proto), one per message of `all()`.
    const SEEDS: [&str; 10] = [
        "hello",
        "hello_back",
        "write_notif",
        "write_empty_notif",
        "write_no_notif",
        "write_done",
        "read",
        "read_resp",
        "notif",
        "read_packed",
    ];

    #[test]
    fn fuzz_seeds_are_the_golden_encodings_of_every_message() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/nixl_proto");
        for (name, m) in SEEDS.iter().zip(all()) {
            let seed = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
            assert_eq!(seed, m.encode(), "{name}");
            assert_eq!(Msg::decode(&seed).unwrap(), m, "{name}");
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn empty_notification_is_not_no_notification() {
        let with = Msg::Write {
            id: 1,
            mem: 0,
            descs: vec![],
            layout: vec![],
            notif: Some(vec![]),
        };
        let Msg::Write { notif, .. } = Msg::decode(&with.encode()).unwrap() else {
            panic!("kind changed")
        };
        assert_eq!(notif, Some(vec![]));
    }

    #[test]
    fn header_layout_is_pinned() {
        let b = Msg::Notif { msg: vec![9] }.encode();
        assert_eq!(&b[..4], b"TXNX");
        assert_eq!(&b[4..6], &[2, 0]);
        assert_eq!(b[6], K_NOTIF);
        assert_eq!(&b[8..12], &5u32.to_le_bytes());
        assert_eq!(b.len(), HDR_LEN + 5);
    }

    #[test]
    fn truncations_and_garbage_are_errors_not_panics() {
        for m in all() {
            let b = m.encode();
            for n in 0..b.len() {
                assert!(Msg::decode(&b[..n]).is_err(), "{m:?} cut at {n}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(Msg::decode(&longer).is_err());
        }
        let mut rng = 0x1234_5678_u64;
        for _ in 0..2000 {
            let n = (rng % 80) as usize;
            let mut v: Vec<u8> = (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            if v.len() >= 8 {
                v[..4].copy_from_slice(&MAGIC.to_le_bytes());
                v[4..6].copy_from_slice(&VERSION.to_le_bytes());
            }
            let _ = Msg::decode(&v);
        }
    }

    #[test]
    fn oversized_descriptor_count_is_refused() {
        let mut b = Msg::Read {
            id: 1,
            mem: 0,
            descs: vec![],
            layout: vec![],
        }
        .encode();
        let at = HDR_LEN + 12;
        b[at..at + 4].copy_from_slice(&(MAX_DESCS as u32 + 1).to_le_bytes());
        assert!(matches!(Msg::decode(&b), Err(Error::Protocol(_))));
    }

    #[test]
    fn largest_messages_fit_the_header_buffer() {
        let m = Msg::Write {
            id: u64::MAX,
            mem: 0,
            descs: vec![Desc { addr: 0, len: 0 }; MAX_DESCS],
            layout: vec![1; MAX_DESCS],
            notif: Some(vec![0; MAX_NOTIF]),
        };
        assert!(m.encode().len() <= MAX_MSG);
    }

    #[test]
    fn layouts_that_do_not_cover_the_descriptors_are_refused() {
        let d = |len| Desc { addr: 0, len };
        let read = |descs: Vec<Desc>, layout: Vec<u32>| {
            Msg::Read {
                id: 1,
                mem: 0,
                descs,
                layout,
            }
            .encode()
        };
        let ok = read(vec![d(1); 4], vec![1, 3]);
        assert!(Msg::decode(&ok).is_ok());
        let bad = [
            read(vec![d(1); 4], vec![1, 2]),        // too few
            read(vec![d(1); 4], vec![1, 4]),        // too many
            read(vec![d(1); 4], vec![0, 4]),        // an empty message
            read(vec![d(1); 2], vec![1, 1, 1]),     // longer than the list
            read(vec![d(1); 2], vec![]),            // none
            read(vec![d(3 << 20); 2], vec![2]),     // a pack over MAX_PACK
            read(vec![d(u64::MAX), d(2)], vec![2]), // lengths that wrap
        ];
        for b in bad {
            assert!(matches!(Msg::decode(&b), Err(Error::Protocol(_))));
        }
        // One descriptor alone may be of any length.
        assert!(Msg::decode(&read(vec![d(1 << 40)], vec![1])).is_ok());
    }
}
