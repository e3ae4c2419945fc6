//! The control protocol on an in-memory pair of endpoints: a sender and a
//! receiver joined by two byte pipes that the test moves bytes through,
//! in pieces of any size, with a clock the test advances.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::error::Error;
use crate::wire::{Ack, Dial, Msg, Ping, Placed, Post, Retire, MAX_PLACED_BYTES, MSG_INLINE};

#[derive(Debug, Clone, PartialEq, Eq)]
enum REv {
    Deliver {
        token: Token,
        buf: usize,
        payload: Vec<u8>,
    },
    Place {
        token: Token,
        buf: usize,
        seq: u64,
        size: u64,
    },
    Refused {
        token: Token,
        err: Error,
        bufs: Vec<usize>,
    },
    Retire {
        index: u16,
        generation: u32,
    },
}

fn own(e: RecvEvent<'_>) -> REv {
    match e {
        RecvEvent::Deliver {
            token,
            buf,
            payload,
        } => REv::Deliver {
            token,
            buf,
            payload: payload.to_vec(),
        },
        RecvEvent::Place { token, buf, msg } => REv::Place {
            token,
            buf,
            seq: msg.seq,
            size: msg.size,
        },
        RecvEvent::Refused { token, err, bufs } => REv::Refused { token, err, bufs },
        RecvEvent::Retire { index, generation } => REv::Retire { index, generation },
    }
}

const MS: Duration = Duration::from_millis(1);

struct Pair {
    s: SendSide,
    r: RecvSide,
    now: Instant,
    se: Vec<SendEvent>,
    re: Vec<REv>,
    /// Bytes written by one end and not yet read by the other.
    s2r: Vec<u8>,
    r2s: Vec<u8>,
    /// Largest read or write the pipes allow at once.
    io: usize,
}

impl Pair {
    fn new(timeout: Option<Duration>) -> Self {
        let now = Instant::now();
        let p = Params {
            timeout,
            peer_timeout: timeout,
            inline_threshold: 65536,
            inline_max: 256 << 10,
        };
        Pair {
            s: SendSide::new(p, now),
            r: RecvSide::new(p, now),
            now,
            se: Vec::new(),
            re: Vec::new(),
            s2r: Vec::new(),
            r2s: Vec::new(),
            io: usize::MAX,
        }
    }

    fn send(&mut self, token: Token, size: u64, tag: i32) {
        self.send_as(token, size, tag, size <= 65536);
    }

    /// `inline`: as the comm sends a lone message of up to 256 KiB.
    fn send_as(&mut self, token: Token, size: u64, tag: i32, inline: bool) {
        let se = &mut self.se;
        if inline {
            let payload: Vec<u8> = (0..size).map(|i| (i as u8) ^ (token as u8)).collect();
            self.s
                .send_inline(token, tag, &payload, &mut |e| se.push(e))
                .unwrap();
        } else {
            self.s
                .send_chunked(token, size, tag, 1 << 19, &mut |e| se.push(e))
                .unwrap();
        }
    }

    fn post(&mut self, token: Token, bufs: &[(u64, i32)]) {
        let re = &mut self.re;
        self.r.post(token, bufs, &mut |e| re.push(own(e))).unwrap();
    }

    /// Each end writes what it has, then each reads what reached it.
    fn step(&mut self) -> bool {
        let mut moved = false;
        let n = self.s.output().len().min(self.io);
        if n > 0 {
            self.s2r.extend_from_slice(&self.s.output()[..n]);
            let se = &mut self.se;
            self.s.wrote(n, self.now, &mut |e| se.push(e));
            moved = true;
        }
        let n = self.r.output().len().min(self.io);
        if n > 0 {
            self.r2s.extend_from_slice(&self.r.output()[..n]);
            self.r.wrote(n, self.now);
            moved = true;
        }
        if !self.s2r.is_empty() {
            let room = self.r.inbox_space();
            let n = room.len().min(self.s2r.len()).min(self.io);
            room[..n].copy_from_slice(&self.s2r[..n]);
            self.s2r.drain(..n);
            let re = &mut self.re;
            self.r.received(n, self.now, &mut |e| re.push(own(e)));
            moved = true;
        }
        if !self.r2s.is_empty() {
            let room = self.s.inbox_space();
            let n = room.len().min(self.r2s.len()).min(self.io);
            room[..n].copy_from_slice(&self.r2s[..n]);
            self.r2s.drain(..n);
            let se = &mut self.se;
            self.s.received(n, self.now, &mut |e| se.push(e));
            moved = true;
        }
        assert!(self.s.counts_agree());
        moved
    }

    fn run(&mut self) {
        while self.step() {}
    }

    /// Advances the clock in ticks of `tick`, both ends polling, bytes moving.
    fn pass(&mut self, d: Duration, tick: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += tick;
            self.s.poll(self.now);
            self.r.poll(self.now, true);
            self.run();
        }
    }

    fn acks_for_places(&mut self) {
        for e in std::mem::take(&mut self.re) {
            if let REv::Place { seq, .. } = e {
                self.r.placed(seq);
            }
        }
        self.run();
    }
}

fn payload_of(token: Token, size: u64) -> Vec<u8> {
    (0..size).map(|i| (i as u8) ^ (token as u8)).collect()
}

#[test]
fn inline_messages_either_order() {
    // Posted first.
    let mut p = Pair::new(None);
    p.post(100, &[(64, 1)]);
    p.send(1, 5, 1);
    p.run();
    assert_eq!(p.se, vec![SendEvent::Written(1)]);
    assert_eq!(
        p.re,
        vec![REv::Deliver {
            token: 100,
            buf: 0,
            payload: payload_of(1, 5)
        }]
    );
    // Sent first: it waits in the receiver until the receive is posted.
    let mut p = Pair::new(None);
    p.send(1, 0, 3);
    p.run();
    assert_eq!(p.se, vec![SendEvent::Written(1)]);
    assert!(p.re.is_empty());
    p.post(100, &[(0, 3)]);
    assert_eq!(
        p.re,
        vec![REv::Deliver {
            token: 100,
            buf: 0,
            payload: vec![]
        }]
    );
}

#[test]
fn chunks_wait_for_the_receive_and_the_ack_completes_the_send() {
    for posted_first in [true, false] {
        let mut p = Pair::new(None);
        if posted_first {
            p.post(100, &[(1 << 20, 7)]);
            p.run();
        }
        p.send(1, 1 << 20, 7);
        p.run();
        if !posted_first {
            assert!(
                p.se.is_empty(),
                "no chunk may leave before the receive exists"
            );
            p.post(100, &[(1 << 20, 7)]);
            p.run();
        }
        assert_eq!(p.se, vec![SendEvent::Start { token: 1, seq: 0 }]);
        assert_eq!(
            p.re,
            vec![REv::Place {
                token: 100,
                buf: 0,
                seq: 0,
                size: 1 << 20
            }]
        );
        p.acks_for_places();
        assert_eq!(p.se.last(), Some(&SendEvent::Acked(1)));
    }
}

#[test]
fn a_truncated_group_consumes_exactly_its_messages() {
    // Finding 1's shape: {64 MiB+1 tag 1, 10 B tag 2}; the sender sends 64
    // MiB (1), 100 B (2, truncated), 64 MiB (3) into the next receive.
    let mut p = Pair::new(None);
    let big = 64 << 20;
    p.post(100, &[(big + 1, 1), (10, 2)]);
    p.post(200, &[(big, 3)]);
    p.send(1, big, 1);
    p.send(2, 100, 2);
    p.send(3, big, 3);
    p.run();
    assert_eq!(
        p.re,
        vec![
            REv::Place {
                token: 100,
                buf: 0,
                seq: 0,
                size: big
            },
            REv::Refused {
                token: 100,
                err: Error::Truncated {
                    tag: 2,
                    message: 100,
                    buffer: 10
                },
                bufs: vec![1],
            },
            REv::Place {
                token: 200,
                buf: 0,
                seq: 2,
                size: big
            },
        ]
    );
    // The sender starts both big messages and learns nothing of the
    // inline one beyond its write.
    assert_eq!(
        p.se,
        vec![
            SendEvent::Written(2),
            SendEvent::Start { token: 1, seq: 0 },
            SendEvent::Start { token: 3, seq: 2 },
        ]
    );
}

#[test]
fn a_refused_chunked_message_never_starts_and_both_ends_say_why() {
    let mut p = Pair::new(None);
    p.post(100, &[(1 << 20, 1)]);
    p.post(200, &[(1 << 20, 2)]);
    p.send(1, 2 << 20, 1); // too big
    p.send(2, 1 << 20, 9); // no such tag
    p.send(3, 1 << 20, 2); // fine, into the next-but-one receive? No: 200 took 2's mismatch.
    p.post(300, &[(1 << 20, 2)]);
    p.run();
    let trunc = Error::Truncated {
        tag: 1,
        message: 2 << 20,
        buffer: 1 << 20,
    };
    assert_eq!(
        p.se,
        vec![
            SendEvent::Refused {
                token: 1,
                err: trunc.clone()
            },
            SendEvent::Refused {
                token: 2,
                err: Error::TagMismatch(9)
            },
            SendEvent::Start { token: 3, seq: 2 },
        ]
    );
    assert_eq!(
        p.re,
        vec![
            REv::Refused {
                token: 100,
                err: trunc,
                bufs: vec![0]
            },
            REv::Refused {
                token: 200,
                err: Error::TagMismatch(9),
                bufs: vec![0]
            },
            REv::Place {
                token: 300,
                buf: 0,
                seq: 2,
                size: 1 << 20
            },
        ]
    );
}

#[test]
fn the_eager_window_holds_inline_messages_nobody_receives() {
    let mut p = Pair::new(None);
    let n = EAGER_WINDOW / 65536 + 4;
    for t in 0..n as u64 {
        p.send(t, 65536, 0);
    }
    p.run();
    let written = p.se.len();
    assert_eq!(
        written,
        EAGER_WINDOW / 65536,
        "the window admits exactly its bytes"
    );
    for t in 0..n as u64 {
        p.post(1000 + t, &[(65536, 0)]);
        p.run();
    }
    p.pass(10 * MS, 5 * MS); // a tick sends the last deferred receives
    assert_eq!(
        p.se.len(),
        n,
        "every message left once receives took the earlier ones"
    );
    assert_eq!(p.re.len(), n);
    for (i, e) in p.re.iter().enumerate() {
        assert!(
            matches!(e, REv::Deliver { token, .. } if *token == 1000 + i as u64),
            "{e:?}"
        );
    }
}

#[test]
fn small_receives_are_told_together_and_large_ones_at_once() {
    let mut p = Pair::new(None);
    for t in 0..5 {
        p.post(t, &[(100, 0)]);
    }
    assert!(p.r.output().is_empty(), "small receives wait");
    assert_eq!(p.r.deferred(), 5);
    p.post(9, &[(100, 0), (1 << 20, 1)]);
    assert_eq!(
        p.r.deferred(),
        0,
        "a receive that may take chunks flushes all before it"
    );
    assert_eq!(p.r.output().len(), 5 * (28 + 12) + 28 + 24);
    let mut q = Pair::new(None);
    for t in 0..16 {
        q.post(t, &[(1, 0)]);
    }
    assert_eq!(q.r.deferred(), 0, "at most 16 wait");
}

#[test]
fn a_late_receiver_is_never_killed_and_a_silent_peer_is() {
    // The receiver posts 30 s after a large send, with a 2 s peer timeout:
    // heartbeats keep both ends alive, then the message starts.
    let mut p = Pair::new(Some(2000 * MS));
    p.send(1, 1 << 30, 0);
    p.pass(Duration::from_secs(30), 100 * MS);
    assert!(p.s.broken().is_none() && p.r.broken().is_none());
    assert!(p.se.is_empty());
    p.post(100, &[(1 << 30, 0)]);
    p.run();
    assert_eq!(p.se, vec![SendEvent::Start { token: 1, seq: 0 }]);

    // The receiver freezes (its bytes stop): the sender gives up after the
    // timeout and not before.
    let mut p = Pair::new(Some(2000 * MS));
    let t0 = p.now;
    while p.s.broken().is_none() {
        p.now += 100 * MS;
        p.s.poll(p.now);
        let se = &mut p.se;
        let n = p.s.output().len();
        p.s.wrote(n, p.now, &mut |e| se.push(e));
    }
    let after = p.now - t0;
    assert_eq!(
        p.s.broken(),
        Some(&Error::PeerUnresponsive { after_ms: 2000 })
    );
    assert!(after > 2000 * MS && after <= 2100 * MS, "{after:?}");
}

#[test]
fn heartbeats_flow_both_ways_when_idle() {
    let mut p = Pair::new(Some(2000 * MS));
    p.pass(Duration::from_secs(10), 50 * MS);
    assert!(p.s.broken().is_none() && p.r.broken().is_none());
    // 10 s at one Ping per 500 ms each way; nothing else happened.
    assert!(p.se.is_empty() && p.re.is_empty());
}

#[test]
fn a_retirement_is_answered_with_what_is_in_place_and_a_dial_reaches_the_sender() {
    let mut p = Pair::new(None);
    p.post(100, &[(1 << 30, 7)]);
    p.send(1, 1 << 30, 7);
    p.run();
    p.s.retire(3, 1);
    p.io = 7; // frames cut into small reads
    p.run();
    assert_eq!(
        p.re.last(),
        Some(&REv::Retire {
            index: 3,
            generation: 1
        })
    );
    // 1 GiB in 512 KiB chunks: 2048 chunks, 256 bitmap bytes; a larger
    // bitmap goes in several frames.
    let mut bits = vec![0u8; MAX_PLACED_BYTES + 10];
    bits[0] = 0b101;
    bits[MAX_PLACED_BYTES] = 1;
    p.r.report(0, &bits);
    let d = Dial {
        index: 3,
        generation: 2,
        token: [9; 16],
        addr: "10.0.0.7:1234".parse().unwrap(),
    };
    p.r.dial(&d);
    p.se.clear();
    p.run();
    assert_eq!(
        p.se,
        vec![
            SendEvent::Placed(Placed {
                seq: 0,
                first: 0,
                bits: bits[..MAX_PLACED_BYTES].to_vec()
            }),
            SendEvent::Placed(Placed {
                seq: 0,
                first: 8 * MAX_PLACED_BYTES as u64,
                bits: bits[MAX_PLACED_BYTES..].to_vec()
            }),
            SendEvent::Dial(d),
        ]
    );
    assert!(p.s.broken().is_none() && p.r.broken().is_none());
}

#[test]
fn protocol_violations_fail_the_comm() {
    let inline = |seq| Msg {
        seq,
        size: 1,
        tag: 0,
        chunk_size: 0,
        flags: MSG_INLINE,
    };
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", vec![0xEE; 64], true),
        (
            "a gap in message numbers",
            [inline(1).encode().to_vec(), vec![0]].concat(),
            true,
        ),
        (
            "an ack to the receiver",
            Ack { seq: 0 }.encode().to_vec(),
            true,
        ),
        (
            "a post to the receiver",
            Post {
                post_seq: 0,
                bufs: vec![(1, 1)],
            }
            .encode(),
            true,
        ),
        ("a ping", Ping { count: 1 }.encode().to_vec(), false),
        (
            "a retirement",
            Retire {
                index: 0,
                generation: 0,
            }
            .encode()
            .to_vec(),
            false,
        ),
        (
            "a report to the receiver",
            Placed {
                seq: 0,
                first: 0,
                bits: vec![1],
            }
            .encode(),
            true,
        ),
        (
            "a huge chunk size",
            Msg {
                seq: 0,
                size: 1 << 40,
                tag: 0,
                chunk_size: u32::MAX,
                flags: 0,
            }
            .encode()
            .to_vec(),
            true,
        ),
    ];
    for (what, bytes, fails) in cases {
        let mut p = Pair::new(None);
        let room = p.r.inbox_space();
        room[..bytes.len()].copy_from_slice(&bytes);
        p.r.received(bytes.len(), p.now, &mut |_| {});
        assert_eq!(p.r.broken().is_some(), fails, "receiver, {what}");
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an ack of nothing", Ack { seq: 3 }.encode().to_vec()),
        (
            "a post out of order",
            Post {
                post_seq: 1,
                bufs: vec![(1, 1)],
            }
            .encode(),
        ),
        ("a message to the sender", inline(0).encode().to_vec()),
        (
            "a retirement to the sender",
            Retire {
                index: 0,
                generation: 0,
            }
            .encode()
            .to_vec(),
        ),
        (
            "a report of a message never announced",
            Placed {
                seq: 0,
                first: 0,
                bits: vec![1],
            }
            .encode(),
        ),
        ("a v1 header", {
            let mut b = Ping { count: 0 }.encode();
            b[4] = 1;
            b.to_vec()
        }),
    ];
    for (what, bytes) in cases {
        let mut p = Pair::new(None);
        let room = p.s.inbox_space();
        room[..bytes.len()].copy_from_slice(&bytes);
        p.s.received(bytes.len(), p.now, &mut |_| {});
        assert!(
            matches!(p.s.broken(), Some(Error::Protocol(_))),
            "sender, {what}"
        );
    }
    // A receiver flooded past the eager window (a hostile sender).
    let mut p = Pair::new(None);
    let mut flood = Vec::new();
    for seq in 0..20u64 {
        let m = Msg {
            seq,
            size: 65536,
            tag: 0,
            chunk_size: 0,
            flags: MSG_INLINE,
        };
        flood.extend(m.encode());
        flood.extend(vec![0u8; 65536]);
    }
    let mut at = 0;
    while at < flood.len() && p.r.broken().is_none() {
        let room = p.r.inbox_space();
        let n = room.len().min(flood.len() - at);
        room[..n].copy_from_slice(&flood[at..at + n]);
        at += n;
        p.r.received(n, p.now, &mut |_| {});
    }
    assert!(matches!(p.r.broken(), Some(Error::Protocol(_))));
    // A closed peer.
    let mut p = Pair::new(None);
    p.s.received(0, p.now, &mut |_| {});
    assert!(matches!(p.s.broken(), Some(Error::ConnectionLost(_))));
}

#[test]
fn a_lone_message_is_done_once_written_and_accepted() {
    // Sent first: written at once, done only when its receive shows up.
    let mut p = Pair::new(None);
    p.send_as(1, 100_000, 1, true);
    p.run();
    assert!(p.se.is_empty(), "{:?}", p.se);
    p.post(100, &[(100_000, 1)]);
    p.run();
    assert_eq!(p.se, vec![SendEvent::Written(1)]);
    // Refused: the send fails as a chunked one would, written or not.
    let mut p = Pair::new(None);
    p.post(100, &[(99_999, 1)]);
    p.run();
    p.send_as(1, 100_000, 1, true);
    p.run();
    let trunc = Error::Truncated {
        tag: 1,
        message: 100_000,
        buffer: 99_999,
    };
    assert_eq!(
        p.se,
        vec![SendEvent::Refused {
            token: 1,
            err: trunc.clone()
        }]
    );
    assert_eq!(
        p.re,
        vec![REv::Refused {
            token: 100,
            err: trunc,
            bufs: vec![0]
        }]
    );
    // A small receive is told later, with others; one that refuses a lone
    // message is told at once (its sender waits for it).
    let mut p = Pair::new(None);
    p.post(100, &[(10, 1)]);
    assert_eq!(p.r.deferred(), 1);
    p.send_as(1, 100_000, 1, true);
    p.run();
    assert!(
        matches!(&p.se[..], [SendEvent::Refused { token: 1, .. }]),
        "{:?}",
        p.se
    );
    // Up to the threshold an inline message is done once written.
    let mut p = Pair::new(None);
    p.send_as(1, 65_536, 1, true);
    p.run();
    assert_eq!(p.se, vec![SendEvent::Written(1)]);
}

/// What the sender awaits from the receiver, and what of it needs a
/// watch (a progress thread woken by the receiver's bytes): a lone
/// message awaits its Post only to learn its fate, which the owner's next
/// test reads; a chunked one's chunks leave on it.
#[test]
fn only_what_moves_on_the_peer_needs_a_watch() {
    // (what is sent, awaits the peer, needs a watch), before the receive.
    let cases: [(&str, u64, bool, bool, bool); 3] = [
        ("small inline", 1000, true, false, false),
        ("lone inline", 100_000, true, true, false),
        ("chunked", 100_000, false, true, true),
    ];
    for (what, size, inline, awaits, watch) in cases {
        let mut p = Pair::new(None);
        p.send_as(1, size, 1, inline);
        p.run();
        assert_eq!(p.s.awaits_peer(), awaits, "{what}: awaits the peer");
        assert_eq!(p.s.moves_on_peer(), watch, "{what}: needs a watch");
        p.post(100, &[(size, 1)]);
        p.run();
        assert!(
            p.s.moves_on_peer() != inline,
            "{what}: a chunked one awaits its Ack"
        );
    }
    // A chunked message behind a lone one needs the watch.
    let mut p = Pair::new(None);
    p.send_as(1, 100_000, 1, true);
    p.send_as(2, 100_000, 1, false);
    p.run();
    assert!(p.s.moves_on_peer());
    p.post(100, &[(100_000, 1)]);
    p.run();
    assert!(p.s.moves_on_peer(), "the chunked one still waits");
    p.post(101, &[(100_000, 1)]);
    p.run();
    assert!(p.s.moves_on_peer(), "its Ack is awaited");
}

#[test]
fn inline_messages_past_what_the_receiver_announced_fail_the_comm() {
    let mut p = Pair::new(None);
    p.post(100, &[(300_000, 1)]);
    p.send_as(1, 256 << 10, 1, true);
    p.run();
    assert_eq!(p.se, vec![SendEvent::Written(1)]);
    let whole = payload_of(1, 256 << 10);
    assert!(
        matches!(&p.re[..], [REv::Deliver { token: 100, buf: 0, payload }] if *payload == whole),
        "the whole 256 KiB delivered"
    );
    // A receiver that announced 64 KiB.
    let mut p = Pair::new(None);
    p.r = RecvSide::new(
        Params {
            timeout: None,
            peer_timeout: None,
            inline_threshold: 65536,
            inline_max: 65536,
        },
        p.now,
    );
    p.post(100, &[(300_000, 1)]);
    p.send_as(1, 65537, 1, true);
    p.run();
    assert!(
        matches!(p.r.broken(), Some(Error::Protocol(e)) if e.contains("65537 bytes")),
        "{:?}",
        p.r.broken()
    );
    assert!(p.re.is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Post(Vec<(u64, i32)>),
    /// Size, tag, and whether a mid-size one travels inline (as a lone one does).
    Send(u64, i32, bool),
    Step,
    Tick,
    Place,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        proptest::collection::vec((prop_oneof![0u64..200, 60_000u64..200_000], 0i32..3), 1..=3)
            .prop_map(Op::Post),
        (
            prop_oneof![0u64..200, 60_000u64..=262_144],
            0i32..3,
            any::<bool>()
        )
            .prop_map(|(s, t, lone)| Op::Send(s, t, lone)),
        Just(Op::Step),
        Just(Op::Tick),
        Just(Op::Place),
    ]
}

proptest! {
    /// Any interleaving of posts, sends, partial byte moves and ticks gives
    /// the fates that the order alone decides (messages in sequence order
    /// to receives in posting order): the same at both ends, inline
    /// payloads intact, and no chunked message started without its receive.
    #[test]
    fn both_ends_agree_whatever_the_order(ops in proptest::collection::vec(op(), 1..80), io in 1usize..200) {
        let mut p = Pair::new(Some(Duration::from_secs(60)));
        p.io = io;
        let mut sent: Vec<(u64, i32, bool)> = Vec::new();
        // Lone ones stay within the eager window, as the comm's do (each
        // waits for the one before): the reference has no queue.
        let mut lone_left = 3;
        let mut posts: Vec<Vec<(u64, i32)>> = Vec::new();
        let mut placed = Vec::new();
        for o in ops {
            match o {
                Op::Post(bufs) => { p.post(10_000 + posts.len() as u64, &bufs); posts.push(bufs); }
                Op::Send(size, tag, lone) => {
                    let inline = size <= 65536 || (lone && lone_left > 0);
                    lone_left -= usize::from(inline && size > 65536);
                    p.send_as(sent.len() as u64, size, tag, inline);
                    sent.push((size, tag, inline));
                }
                Op::Step => { p.step(); }
                Op::Tick => { p.now += MS; p.s.poll(p.now); p.r.poll(p.now, true); }
                Op::Place => {
                    for e in &p.re {
                        if let REv::Place { seq, .. } = e {
                            if !placed.contains(seq) { placed.push(*seq); p.r.placed(*seq); }
                        }
                    }
                }
            }
            prop_assert!(p.s.broken().is_none(), "{:?}", p.s.broken());
            prop_assert!(p.r.broken().is_none(), "{:?}", p.r.broken());
        }
        p.now += MS;
        p.r.poll(p.now, true);
        p.run();

        let mut reference = matcher::Matcher::new();
        for (g, bufs) in posts.iter().enumerate() {
            reference.push(10_000 + g as u64, bufs);
        }
        let mut want_s = Vec::new();
        let mut want_r = Vec::new();
        for (seq, &(size, tag, inline)) in sent.iter().enumerate() {
            let seq = seq as u64;
            let lone = inline && size > 65536;
            if inline && !lone {
                want_s.push(SendEvent::Written(seq));
            }
            let Some(o) = reference.assign(size, tag) else { continue };
            let err = match o.verdict {
                matcher::Verdict::Accept => None,
                matcher::Verdict::Truncated { buffer } => Some(Error::Truncated { tag, message: size, buffer }),
                matcher::Verdict::Mismatch => Some(Error::TagMismatch(tag)),
            };
            match (err, inline) {
                (None, true) => {
                    if lone {
                        // Done once written and its receive accepts it.
                        want_s.push(SendEvent::Written(seq));
                    }
                    want_r.push(REv::Deliver { token: o.group, buf: o.buf.unwrap(), payload: payload_of(seq, size) })
                }
                (None, false) => {
                    want_s.push(SendEvent::Start { token: seq, seq });
                    want_r.push(REv::Place { token: o.group, buf: o.buf.unwrap(), seq, size });
                }
                (Some(err), _) => {
                    if !inline || lone {
                        want_s.push(SendEvent::Refused { token: seq, err: err.clone() });
                    }
                    let mut bufs = o.released.clone();
                    bufs.extend(o.buf);
                    bufs.sort_unstable();
                    want_r.push(REv::Refused { token: o.group, err, bufs });
                }
            }
        }
        prop_assert_eq!(&p.re, &want_r);
        // Sender events: same set; Written and Start/Refused interleave by timing.
        let strip = |v: &[SendEvent]| {
            let mut w: Vec<String> = v.iter().filter(|e| !matches!(e, SendEvent::Acked(_))).map(|e| format!("{e:?}")).collect();
            w.sort();
            w
        };
        prop_assert_eq!(strip(&p.se), strip(&want_s));
        let acked = p.se.iter().filter(|e| matches!(e, SendEvent::Acked(_))).count();
        prop_assert_eq!(acked, placed.len());
    }
}

proptest! {
    /// What the fuzz target does, on a budget: hostile control bytes never panic.
    #[test]
    fn hostile_control_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        super::feed_both(&data);
    }

    /// Valid frames with one byte changed never panic either.
    #[test]
    fn mutated_control_streams_never_panic(i in 0usize..200, v: u8, cut: u8) {
        let mut stream = vec![cut];
        stream.extend(Msg { seq: 0, size: 3, tag: 2, chunk_size: 0, flags: MSG_INLINE }.encode());
        stream.extend(b"abc");
        stream.extend(Post { post_seq: 0, bufs: vec![(5, 2)] }.encode());
        stream.extend(Ack { seq: 0 }.encode());
        stream.extend(Ping { count: 1 }.encode());
        let at = 1 + i % (stream.len() - 1);
        stream[at] = v;
        super::feed_both(&stream);
    }
}

#[test]
fn after_a_goodbye_what_was_sent_can_still_be_received() {
    // The sender sends two small messages and closes before any receive is
    // posted: both arrive, the receive after them fails as closed by the peer.
    let mut p = Pair::new(None);
    p.post(100, &[(64, 7)]);
    p.send(1, 5, 1);
    p.send(2, 6, 2);
    p.run();
    p.s.bye();
    p.run();
    assert!(p.r.broken().is_none() && p.r.peer_gone() == Some(&Error::PeerClosed));
    p.post(200, &[(64, 2)]);
    p.post(300, &[(64, 3), (64, 4)]);
    assert_eq!(
        p.re,
        vec![
            REv::Refused {
                token: 100,
                err: Error::TagMismatch(1),
                bufs: vec![0]
            },
            REv::Deliver {
                token: 200,
                buf: 0,
                payload: payload_of(2, 6)
            },
            REv::Refused {
                token: 300,
                err: Error::PeerClosed,
                bufs: vec![0, 1]
            },
        ]
    );
    // A receive already posted when the Bye comes fails at once.
    let mut q = Pair::new(None);
    q.post(100, &[(64, 1)]);
    q.run();
    q.s.bye();
    q.run();
    assert_eq!(
        q.re,
        vec![REv::Refused {
            token: 100,
            err: Error::PeerClosed,
            bufs: vec![0]
        }]
    );
    // Nothing may follow a Bye.
    let room = q.r.inbox_space();
    let ping = Ping { count: 9 }.encode();
    room[..ping.len()].copy_from_slice(&ping);
    q.r.received(ping.len(), q.now, &mut |_| {});
    assert!(matches!(q.r.broken(), Some(Error::Protocol(_))));
    // The receiver's Bye fails the sender outright: nothing can be delivered.
    let mut r = Pair::new(None);
    r.r.bye();
    r.run();
    assert_eq!(r.s.broken(), Some(&Error::PeerClosed));
    // Nothing after a failure is said: a broken end sends no Bye.
    r.s.bye();
    assert!(r.s.output().is_empty());
}

#[test]
fn own_maps_spread_sequential_numbers_over_the_control_bytes() {
    use std::hash::BuildHasher;
    // hashbrown matches on the top 7 bits first: tokens 0, 1, 2, ... must
    // not all share them, or every lookup compares every key.
    let b = BuildOwnHasher::default();
    let tags: std::collections::HashSet<u64> = (0..1024u64).map(|t| b.hash_one(t) >> 57).collect();
    assert!(tags.len() >= 120, "{} distinct tags of 128", tags.len());
    let mut m: OwnMap<u64> = OwnMap::default();
    for t in 0..10_000 {
        m.insert(t, t * 3);
    }
    for t in (0..10_000).step_by(7) {
        assert_eq!(m.remove(&t), Some(t * 3));
    }
    assert_eq!(m.len(), 10_000 - 10_000usize.div_ceil(7));
}
