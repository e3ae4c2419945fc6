//! Frames of a control stream: a prefix, a fixed header, a payload. The
//! inbox holds received bytes and hands out whole frames, in place.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::wire::{self, Ack, Bye, Dial, Kind, Msg, Ping, Placed, Post, Retire, PREFIX_LEN};

/// A whole frame at the front of an inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A message announcement; `payload` holds an inline message's bytes.
    Msg {
        msg: Msg,
        payload: Range<usize>,
    },
    Post(Post),
    Ack(Ack),
    Ping(Ping),
    Retire(Retire),
    Placed(Placed),
    Dial(Dial),
    Bye,
}

/// Payload an inbox has room for before it grows.
const GROW_ABOVE: usize = 64 * 1024;

/// Received control bytes not yet consumed.
pub(crate) struct Inbox {
    buf: Vec<u8>,
    /// Room for two of the largest frames: `buf` grows to it when a frame
    /// needs it (most comms never see a large inline message).
    limit: usize,
    start: usize,
    end: usize,
    /// Frame kinds this end of the stream accepts.
    accepts: &'static [Kind],
}

impl Inbox {
    /// Room for two of the largest frames of `accepts` (`max_payload` bytes
    /// of payload at most), taken once a frame above 64 KiB needs it.
    pub fn new(accepts: &'static [Kind], max_payload: usize) -> Self {
        let limit = 2 * (wire::MAX_HEADER_LEN + max_payload);
        Inbox {
            buf: vec![0; limit.min(2 * (wire::MAX_HEADER_LEN + GROW_ABOVE))],
            limit,
            start: 0,
            end: 0,
            accepts,
        }
    }

    /// Where the next read goes (never empty: a frame always fits).
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && (self.start == self.end || self.end > self.buf.len() / 2) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.limit && self.front_len() > self.buf.len() / 2 {
            self.buf.resize(self.limit, 0);
        }
        &mut self.buf[self.end..]
    }

    /// The length of the frame at the front, once its prefix is in (0
    /// before, and for a prefix `peek` refuses).
    fn front_len(&self) -> usize {
        let b = &self.buf[self.start..self.end];
        // Checked first: a short prefix's decode error is a formatted
        // string, and an empty inbox is what most reads start from.
        if b.len() < PREFIX_LEN {
            return 0;
        }
        wire::decode_prefix(b).map_or(0, |p| p.kind.header_len() + p.payload_len as usize)
    }

    /// `n` bytes were read into `space()`.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Feeds bytes as if read.
    #[cfg(test)]
    pub fn push(&mut self, mut b: &[u8]) -> usize {
        let mut fed = 0;
        while !b.is_empty() {
            let room = self.space();
            let n = room.len().min(b.len());
            if n == 0 {
                break;
            }
            room[..n].copy_from_slice(&b[..n]);
            self.filled(n);
            b = &b[n..];
            fed += n;
        }
        fed
    }

    /// The frame at the front and its total length; `None` until it is whole.
    pub fn peek(&self) -> Result<Option<(Frame, usize)>> {
        let b = &self.buf[self.start..self.end];
        if b.len() < PREFIX_LEN {
            return Ok(None);
        }
        let p = wire::decode_prefix(b)?;
        if !self.accepts.contains(&p.kind) {
            return Err(Error::Protocol(format!(
                "{:?} header on the control socket",
                p.kind
            )));
        }
        let total = p.kind.header_len() + p.payload_len as usize;
        if total > self.limit / 2 {
            return Err(Error::Protocol(format!(
                "{:?} frame of {total} bytes on the control socket",
                p.kind
            )));
        }
        if b.len() < total {
            return Ok(None);
        }
        let at = self.start + p.kind.header_len();
        let frame = match p.kind {
            Kind::Msg => Frame::Msg {
                msg: Msg::decode(b)?,
                payload: at..at + p.payload_len as usize,
            },
            Kind::Post => Frame::Post(Post::decode(b)?),
            Kind::Ack => Frame::Ack(Ack::decode(b)?),
            Kind::Ping => Frame::Ping(Ping::decode(b)?),
            Kind::Retire => Frame::Retire(Retire::decode(b)?),
            Kind::Placed => Frame::Placed(Placed::decode(b)?),
            Kind::Dial => Frame::Dial(Dial::decode(b)?),
            Kind::Bye => {
                Bye::decode(b)?;
                Frame::Bye
            }
            k => {
                return Err(Error::Protocol(format!(
                    "{k:?} header on the control socket"
                )))
            }
        };
        Ok(Some((frame, total)))
    }

    pub fn bytes(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// Bytes held but not yet consumed.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.end - self.start
    }
}

/// Bytes waiting to be written, counted from the start of the stream.
#[derive(Default)]
pub(crate) struct Outbox {
    buf: Vec<u8>,
    at: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
}

impl Outbox {
    pub fn put(&mut self, b: &[u8]) {
        if self.at == self.buf.len() {
            self.base += self.at as u64;
            self.buf.clear();
            self.at = 0;
        }
        self.buf.extend_from_slice(b);
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    pub fn is_empty(&self) -> bool {
        self.at == self.buf.len()
    }

    /// The kernel took `n` bytes of `pending()`.
    pub fn wrote(&mut self, n: usize) {
        self.at = (self.at + n).min(self.buf.len());
        if self.at == self.buf.len() || self.at > (1 << 20) {
            self.buf.drain(..self.at);
            self.base += self.at as u64;
            self.at = 0;
        }
    }

    /// Stream offset after the last byte put.
    pub fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Stream offset after the last byte written.
    pub fn written(&self) -> u64 {
        self.base + self.at as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: &[Kind] = &[Kind::Msg, Kind::Ping];

    #[test]
    fn frames_come_whole_whatever_the_reads() {
        let msg = Msg {
            seq: 0,
            size: 3,
            tag: 1,
            chunk_size: 0,
            flags: wire::MSG_INLINE,
        };
        let mut stream = msg.encode().to_vec();
        stream.extend(b"abc");
        stream.extend(Ping { count: 4 }.encode());
        for cut in 1..stream.len() {
            let mut ib = Inbox::new(KINDS, 16);
            ib.push(&stream[..cut]);
            let mut got = Vec::new();
            let mut rest = &stream[cut..];
            loop {
                match ib.peek().unwrap() {
                    Some((f, n)) => {
                        if let Frame::Msg { payload, .. } = &f {
                            assert_eq!(ib.bytes(payload.clone()), b"abc");
                        }
                        got.push(f);
                        ib.consume(n);
                    }
                    None if rest.is_empty() => break,
                    None => {
                        let n = ib.push(rest);
                        rest = &rest[n..];
                    }
                }
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[1], Frame::Ping(Ping { count: 4 }));
            assert_eq!(ib.held(), 0);
        }
    }

    #[test]
    fn the_inbox_grows_for_a_large_frame_and_no_further() {
        let mut ib = Inbox::new(KINDS, 256 << 10);
        let small = ib.buf.len();
        assert!(small < 2 * (256 << 10), "{small}");
        let msg = Msg {
            seq: 0,
            size: 200_000,
            tag: 1,
            chunk_size: 0,
            flags: wire::MSG_INLINE,
        };
        let mut stream = msg.encode().to_vec();
        stream.extend((0..200_000u32).map(|i| i as u8));
        let mut rest = &stream[..];
        let mut reads = 0;
        while ib.peek().unwrap().is_none() {
            // Reads of at most 1000 bytes, as a slow socket gives them.
            let n = ib.push(&rest[..rest.len().min(1000)]);
            assert!(n > 0, "room for the whole frame");
            rest = &rest[n..];
            reads += 1;
        }
        let (f, n) = ib.peek().unwrap().unwrap();
        let Frame::Msg { payload, .. } = f else {
            panic!("{f:?}")
        };
        assert!(ib
            .bytes(payload)
            .iter()
            .enumerate()
            .all(|(i, &b)| b == i as u8));
        assert!(reads >= 200);
        assert_eq!(ib.buf.len(), ib.limit);
        ib.consume(n);
        // Past the limit: refused as before.
        let huge = Msg {
            seq: 1,
            size: 300_000,
            tag: 1,
            chunk_size: 0,
            flags: wire::MSG_INLINE,
        };
        ib.push(&huge.encode());
        assert!(matches!(ib.peek(), Err(Error::Protocol(_))));
    }

    #[test]
    fn foreign_kinds_and_oversized_frames_are_protocol_errors() {
        let mut ib = Inbox::new(KINDS, 16);
        ib.push(&Ack { seq: 1 }.encode());
        assert!(matches!(ib.peek(), Err(Error::Protocol(_))));
        let mut ib = Inbox::new(KINDS, 16);
        let big = Msg {
            seq: 0,
            size: 1000,
            tag: 0,
            chunk_size: 0,
            flags: wire::MSG_INLINE,
        };
        ib.push(&big.encode());
        assert!(matches!(ib.peek(), Err(Error::Protocol(_))));
    }

    #[test]
    fn the_outbox_counts_stream_offsets() {
        let mut o = Outbox::default();
        o.put(b"hello");
        o.wrote(2);
        assert_eq!((o.written(), o.end()), (2, 5));
        o.put(b"!");
        o.wrote(4);
        assert!(o.is_empty());
        assert_eq!((o.written(), o.end()), (6, 6));
        o.put(b"xy");
        assert_eq!(o.pending(), b"xy");
        assert_eq!(o.end(), 8);
    }
}
