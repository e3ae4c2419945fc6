//! The receiving end of a comm's control protocol.

use std::collections::VecDeque;
use std::time::Instant;

use super::frame::{Frame, Inbox, Outbox};
use super::liveness::Liveness;
use super::matcher::{Matcher, Outcome, Verdict};
use super::{eager_cost, Params, Token, EAGER_WINDOW, MAX_OPEN_POSTS};
use crate::error::{Error, Result};
use crate::wire::{Ack, Bye, Dial, Kind, Msg, Ping, Placed, Post, MAX_PLACED_BYTES};

/// Small receives wait for this many to go out in one write.
const DEFER_MAX: usize = 16;
/// Largest chunk a peer may announce.
const MAX_CHUNK: u32 = 1 << 30;

/// What the comm layer must do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecvEvent<'a> {
    /// Copy this inline message into buffer `buf` of receive `token`.
    Deliver {
        token: Token,
        buf: usize,
        payload: &'a [u8],
    },
    /// Chunked message `msg` goes to buffer `buf`: its chunks will come.
    Place { token: Token, buf: usize, msg: Msg },
    /// The receive failed with `err` (request-local): buffers `bufs` get
    /// no data (the refused message's buffer and the unfilled ones).
    Refused {
        token: Token,
        err: Error,
        bufs: Vec<usize>,
    },
    /// The sender took data socket `index` (of `generation`) out: close
    /// our end and report what is in place (`report`).
    Retire { index: u16, generation: u32 },
}

/// Everything but the inbox (so frames can be handled in place).
struct State {
    next_seq: u64,
    /// Posted receives with the sequence number of their Post.
    groups: Matcher<(Token, u64)>,
    /// Messages announced before a receive was posted for them.
    stash: VecDeque<(Msg, Vec<u8>)>,
    /// Eager cost of the inline messages in `stash`.
    stash_cost: usize,
    /// Encoded Posts not yet written: small receives go out together.
    deferred: Vec<u8>,
    deferred_n: usize,
    /// Eager cost of the messages matched to deferred receives.
    deferred_cost: usize,
    next_post: u64,
    /// The sender's inline threshold: larger messages come in chunks
    /// unless they travel alone.
    peer_inline: u64,
    /// The largest inline message we accept (as Welcome said).
    inline_max: u64,
    out: Outbox,
    live: Liveness,
    broken: Option<Error>,
    /// The sender said Bye (`PeerClosed`) or closed its control socket
    /// without one (`ConnectionLost`): no more messages come; what it
    /// announced can still be received, other receives fail with this.
    peer_gone: Option<Error>,
}

pub(crate) struct RecvSide {
    inbox: Inbox,
    s: State,
}

impl RecvSide {
    pub fn new(p: Params, now: Instant) -> Self {
        RecvSide {
            inbox: Inbox::new(
                &[Kind::Msg, Kind::Ping, Kind::Bye, Kind::Retire],
                p.inline_max,
            ),
            s: State {
                next_seq: 0,
                groups: Matcher::new(),
                stash: VecDeque::new(),
                stash_cost: 0,
                deferred: Vec::new(),
                deferred_n: 0,
                deferred_cost: 0,
                next_post: 0,
                peer_inline: p.inline_threshold as u64,
                inline_max: p.inline_max as u64,
                out: Outbox::default(),
                live: Liveness::new(p.timeout, p.peer_timeout, now),
                broken: None,
                peer_gone: None,
            },
        }
    }

    pub fn broken(&self) -> Option<&Error> {
        self.s.broken.as_ref()
    }

    /// Fails the comm (first error wins); the comm layer fails every request.
    pub fn fail(&mut self, e: Error) {
        self.s.broken.get_or_insert(e);
    }

    /// Posts a receive of `(len, tag)` buffers (1..=8) and matches what
    /// arrived for it already.
    pub fn post(
        &mut self,
        token: Token,
        bufs: &[(u64, i32)],
        ev: &mut impl FnMut(RecvEvent<'_>),
    ) -> Result<()> {
        if let Some(e) = &self.s.broken {
            return Err(e.clone());
        }
        let s = &mut self.s;
        let post_seq = s.next_post;
        s.next_post += 1;
        s.groups.push((token, post_seq), bufs);
        Post::encode_into(post_seq, bufs, &mut s.deferred);
        s.deferred_n += 1;
        // A receive that may take a chunked message is announced at once.
        if bufs.iter().any(|&(len, _)| len > s.peer_inline) || s.deferred_n >= DEFER_MAX {
            s.flush_posts();
        }
        while !s.groups.is_empty() {
            let Some((msg, payload)) = s.stash.pop_front() else {
                break;
            };
            if msg.is_inline() {
                s.stash_cost -= eager_cost(msg.size);
            }
            s.take(msg, &payload, ev);
        }
        s.abandon_unfillable(ev);
        Ok(())
    }

    /// Why no more messages come, once the sender said Bye or closed its
    /// control socket.
    pub fn peer_gone(&self) -> Option<&Error> {
        self.s.peer_gone.as_ref()
    }

    /// Where the next read from the control socket goes.
    pub fn inbox_space(&mut self) -> &mut [u8] {
        self.inbox.space()
    }

    /// `n` bytes were read into `inbox_space()` (0 = the peer closed).
    pub fn received(&mut self, n: usize, now: Instant, ev: &mut impl FnMut(RecvEvent<'_>)) {
        if self.s.broken.is_some() {
            return;
        }
        if n == 0 {
            // The bytes before its end were sent on purpose: still receivable.
            if self.s.peer_gone.is_none() {
                self.s.peer_gone = Some(Error::ConnectionLost(
                    "the sender closed the control connection without a goodbye (its process ended?)".into(),
                ));
                self.s.abandon_unfillable(ev);
            }
            return;
        }
        self.s.live.heard(now);
        self.inbox.filled(n);
        loop {
            let (frame, len) = match self.inbox.peek() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return self.fail(e),
            };
            let r = match frame {
                _ if self.s.peer_gone.is_some() => Err(Error::Protocol("a frame after Bye".into())),
                Frame::Msg { msg, payload } => self.s.on_msg(msg, self.inbox.bytes(payload), ev),
                Frame::Ping(_) => Ok(()),
                Frame::Retire(r) => {
                    ev(RecvEvent::Retire {
                        index: r.index,
                        generation: r.generation,
                    });
                    Ok(())
                }
                Frame::Bye => {
                    self.s.peer_gone = Some(Error::PeerClosed);
                    self.s.abandon_unfillable(ev);
                    Ok(())
                }
                Frame::Post(_) | Frame::Ack(_) | Frame::Placed(_) | Frame::Dial(_) => Err(
                    Error::Protocol("receiver-side frame from the sender".into()),
                ),
            };
            self.inbox.consume(len);
            if let Err(e) = r {
                return self.fail(e);
            }
        }
    }

    /// Every chunk of message `seq` is in place: acknowledge it.
    pub fn placed(&mut self, seq: u64) {
        if self.s.broken.is_none() {
            self.s.flush_posts();
            self.s.out.put(&Ack { seq }.encode());
        }
    }

    /// Tells the sender which chunks of message `seq` are in place (bit
    /// `k % 8` of `bits[k / 8]` for chunk `k`), in frames of at most
    /// `MAX_PLACED_BYTES` bitmap bytes.
    pub fn report(&mut self, seq: u64, bits: &[u8]) {
        if self.s.broken.is_some() {
            return;
        }
        for (i, piece) in bits.chunks(MAX_PLACED_BYTES).enumerate() {
            let p = Placed {
                seq,
                first: (i * MAX_PLACED_BYTES * 8) as u64,
                bits: piece.to_vec(),
            };
            self.s.out.put(&p.encode());
        }
    }

    /// Invites the sender to reconnect a retired data socket.
    pub fn dial(&mut self, d: &Dial) {
        if self.s.broken.is_none() {
            self.s.out.put(&d.encode());
        }
    }

    /// Says goodbye: the last frame before the comm closes on purpose.
    pub fn bye(&mut self) {
        if self.s.broken.is_none() {
            self.s.flush_posts();
            self.s.out.put(&Bye.encode());
        }
    }

    /// Timers: gives up on a silent peer, sends a heartbeat when quiet.
    /// `tick`: the periodic call, which also sends deferred receives.
    pub fn poll(&mut self, now: Instant, tick: bool) {
        let s = &mut self.s;
        if s.broken.is_some() {
            return;
        }
        if let Err(e) = s.live.check(now) {
            s.broken = Some(e);
            return;
        }
        if tick {
            s.flush_posts();
        }
        if s.out.is_empty() {
            if let Some(count) = s.live.ping_due(now) {
                s.flush_posts();
                s.out.put(&Ping { count }.encode());
            }
        }
    }

    /// When timers next need the comm (`None`: never); `now` while
    /// receives wait to be told.
    pub fn due(&self, now: Instant) -> Option<Instant> {
        if self.s.deferred_n > 0 {
            return Some(now);
        }
        self.s.live.due()
    }

    pub fn output(&self) -> &[u8] {
        self.s.out.pending()
    }

    pub fn wrote(&mut self, n: usize, now: Instant) {
        if n > 0 {
            self.s.out.wrote(n);
            self.s.live.spoke(now);
        }
    }

    /// Receives posted and not yet told to the sender.
    #[cfg(test)]
    pub fn deferred(&self) -> usize {
        self.s.deferred_n
    }

    /// Messages below this sequence number are announced.
    pub fn announced(&self) -> u64 {
        self.s.next_seq
    }
}

impl State {
    /// After the sender's Bye, receives that what it announced cannot fill
    /// fail with `PeerClosed`.
    fn abandon_unfillable(&mut self, ev: &mut impl FnMut(RecvEvent<'_>)) {
        let Some(err) = self.peer_gone.clone() else {
            return;
        };
        if !self.stash.is_empty() {
            return;
        }
        while let Some(((token, _), bufs)) = self.groups.abandon() {
            ev(RecvEvent::Refused {
                token,
                err: err.clone(),
                bufs,
            });
        }
    }

    fn flush_posts(&mut self) {
        if self.deferred_n > 0 {
            self.out.put(&self.deferred);
            self.deferred.clear();
            self.deferred_n = 0;
            self.deferred_cost = 0;
        }
    }

    fn on_msg(
        &mut self,
        msg: Msg,
        payload: &[u8],
        ev: &mut impl FnMut(RecvEvent<'_>),
    ) -> Result<()> {
        if msg.seq != self.next_seq {
            return Err(Error::Protocol(format!(
                "message {} announced, expected {}",
                msg.seq, self.next_seq
            )));
        }
        if msg.is_inline() && msg.size > self.inline_max {
            return Err(Error::Protocol(format!(
                "inline message {} of {} bytes, above the {} announced",
                msg.seq, msg.size, self.inline_max
            )));
        }
        if !msg.is_inline() && msg.chunk_size > MAX_CHUNK {
            return Err(Error::Protocol(format!(
                "message {} in chunks of {} bytes",
                msg.seq, msg.chunk_size
            )));
        }
        self.next_seq += 1;
        if self.stash.is_empty() && !self.groups.is_empty() {
            self.take(msg, payload, ev);
            return Ok(());
        }
        if msg.is_inline() {
            self.stash_cost += eager_cost(msg.size);
        }
        self.stash.push_back((msg, payload.to_vec()));
        if self.stash_cost > EAGER_WINDOW || self.stash.len() > MAX_OPEN_POSTS + EAGER_WINDOW / 64 {
            return Err(Error::Protocol(
                "the sender exceeded the eager window (messages nobody posted a receive for)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Gives `msg` to the oldest posted receive.
    fn take(&mut self, msg: Msg, payload: &[u8], ev: &mut impl FnMut(RecvEvent<'_>)) {
        let Some(Outcome {
            group: (token, post_seq),
            buf,
            verdict,
            mut released,
            ..
        }) = self.groups.assign(msg.size, msg.tag)
        else {
            return;
        };
        let deferred_post = post_seq + self.deferred_n as u64 >= self.next_post;
        match (verdict, buf) {
            (Verdict::Accept, Some(buf)) if msg.is_inline() => ev(RecvEvent::Deliver {
                token,
                buf,
                payload,
            }),
            (Verdict::Accept, Some(buf)) => ev(RecvEvent::Place { token, buf, msg }),
            (verdict, buf) => {
                let err = match verdict {
                    Verdict::Truncated { buffer } => Error::Truncated {
                        tag: msg.tag,
                        message: msg.size,
                        buffer,
                    },
                    _ => Error::TagMismatch(msg.tag),
                };
                released.extend(buf);
                released.sort_unstable();
                ev(RecvEvent::Refused {
                    token,
                    err,
                    bufs: released,
                });
            }
        }
        if deferred_post {
            if msg.is_inline() {
                self.deferred_cost += eager_cost(msg.size);
            }
            // The sender waits to learn a chunked or lone message's
            // receive; the eager window waits for inline ones to be seen taken.
            if !msg.is_inline()
                || msg.size > self.peer_inline
                || self.deferred_cost >= EAGER_WINDOW / 4
            {
                self.flush_posts();
            }
        }
    }
}
