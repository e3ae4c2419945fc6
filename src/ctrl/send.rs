//! The sending end of a comm's control protocol.

use std::collections::VecDeque;
use std::time::Instant;

use super::frame::{Frame, Inbox, Outbox};
use super::liveness::Liveness;
use super::matcher::{Matcher, Verdict};
use super::{eager_cost, OwnMap, Params, Token, EAGER_WINDOW, MAX_OPEN_POSTS};
use crate::error::{Error, Result};
use crate::wire::{Bye, Dial, Kind, Msg, Ping, Placed, Retire, MAX_PLACED_BYTES, MSG_INLINE};

/// What the comm layer must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SendEvent {
    /// An inline message left (the kernel has its bytes; a lone one's
    /// receive accepts it, too): its request is done.
    Written(Token),
    /// The receiver will take chunked message `seq`: its chunks may go.
    Start { token: Token, seq: u64 },
    /// The receiver refuses the message; no chunk of it may go.
    Refused { token: Token, err: Error },
    /// Every chunk of the message is in place at the receiver.
    Acked(Token),
    /// The receiver's answer to a retirement: which chunks of a message
    /// are in place.
    Placed(Placed),
    /// The receiver invites a reconnect of a retired data socket.
    Dial(Dial),
}

enum Queued {
    Inline {
        token: Token,
        tag: i32,
        payload: Vec<u8>,
    },
    Chunked {
        token: Token,
        size: u64,
        tag: i32,
        chunk_size: u32,
    },
}

struct Announced {
    seq: u64,
    size: u64,
    tag: i32,
    token: Token,
    inline: bool,
    /// Its sender waits for the receive that takes it (chunked and lone
    /// messages): the receive's refusal is the send's too.
    needs_post: bool,
}

/// Where a lone message stands: done once written and matched to an
/// accepting receive, whichever comes last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lone {
    Written,
    Matched,
    Refused,
}

pub(crate) struct SendSide {
    next_seq: u64,
    /// Not yet announced because the eager window is full; in order.
    queued: VecDeque<Queued>,
    /// Announced; waiting for the receive that takes them.
    unresolved: VecDeque<Announced>,
    /// Eager cost of the inline messages in `unresolved`.
    uncovered: usize,
    /// Messages in `unresolved` with `needs_post` (counted: `unresolved`
    /// holds up to half the eager window of inline ones, too many to scan
    /// per isend).
    unresolved_needy: usize,
    /// Of those, lone inline messages.
    unresolved_lone: usize,
    /// Lone messages written or matched but not both.
    lone: OwnMap<Lone>,
    awaiting_ack: OwnMap<Token>,
    /// The receiver's posted receives.
    posts: Matcher<()>,
    next_post: u64,
    /// Inline messages in `out`, by the stream offset where they end (and
    /// whether they are lone).
    writing: VecDeque<(u64, Token, bool)>,
    out: Outbox,
    inbox: Inbox,
    live: Liveness,
    broken: Option<Error>,
    /// Inline messages above it are lone ones.
    inline_threshold: u64,
}

impl SendSide {
    pub fn new(p: Params, now: Instant) -> Self {
        SendSide {
            next_seq: 0,
            queued: VecDeque::new(),
            unresolved: VecDeque::new(),
            uncovered: 0,
            unresolved_needy: 0,
            unresolved_lone: 0,
            lone: OwnMap::default(),
            awaiting_ack: OwnMap::default(),
            posts: Matcher::new(),
            next_post: 0,
            writing: VecDeque::new(),
            out: Outbox::default(),
            inbox: Inbox::new(
                &[
                    Kind::Post,
                    Kind::Ack,
                    Kind::Ping,
                    Kind::Bye,
                    Kind::Placed,
                    Kind::Dial,
                ],
                MAX_PLACED_BYTES,
            ),
            live: Liveness::new(p.timeout, p.peer_timeout, now),
            broken: None,
            inline_threshold: p.inline_threshold as u64,
        }
    }

    pub fn broken(&self) -> Option<&Error> {
        self.broken.as_ref()
    }

    /// Fails the comm (first error wins); the comm layer fails every request.
    pub fn fail(&mut self, e: Error) {
        self.broken.get_or_insert(e);
    }

    fn check(&self) -> Result<()> {
        match &self.broken {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Sends `payload` inline: announced at once unless the eager window is full.
    pub fn send_inline(
        &mut self,
        token: Token,
        tag: i32,
        payload: &[u8],
        ev: &mut impl FnMut(SendEvent),
    ) -> Result<()> {
        self.check()?;
        if self.queued.is_empty() && self.fits(payload.len() as u64) {
            self.announce_inline(token, tag, payload);
        } else {
            self.queued.push_back(Queued::Inline {
                token,
                tag,
                payload: payload.to_vec(),
            });
        }
        self.resolve(ev);
        Ok(())
    }

    /// Announces a chunked message; `Start` follows once a receive takes it.
    pub fn send_chunked(
        &mut self,
        token: Token,
        size: u64,
        tag: i32,
        chunk_size: u32,
        ev: &mut impl FnMut(SendEvent),
    ) -> Result<()> {
        self.check()?;
        let q = Queued::Chunked {
            token,
            size,
            tag,
            chunk_size,
        };
        if self.queued.is_empty() {
            self.announce(q);
        } else {
            self.queued.push_back(q);
        }
        self.resolve(ev);
        Ok(())
    }

    fn fits(&self, size: u64) -> bool {
        self.uncovered == 0 || self.uncovered + eager_cost(size) <= EAGER_WINDOW
    }

    fn announce_inline(&mut self, token: Token, tag: i32, payload: &[u8]) {
        let seq = self.take_seq();
        let size = payload.len() as u64;
        let msg = Msg {
            seq,
            size,
            tag,
            chunk_size: 0,
            flags: MSG_INLINE,
        };
        self.out.put(&msg.encode());
        self.out.put(payload);
        let lone = size > self.inline_threshold;
        self.unresolved_needy += usize::from(lone);
        self.unresolved_lone += usize::from(lone);
        self.writing.push_back((self.out.end(), token, lone));
        self.uncovered += eager_cost(size);
        self.unresolved.push_back(Announced {
            seq,
            size,
            tag,
            token,
            inline: true,
            needs_post: lone,
        });
    }

    fn announce(&mut self, q: Queued) {
        match q {
            Queued::Inline {
                token,
                tag,
                payload,
            } => self.announce_inline(token, tag, &payload),
            Queued::Chunked {
                token,
                size,
                tag,
                chunk_size,
            } => {
                let seq = self.take_seq();
                let msg = Msg {
                    seq,
                    size,
                    tag,
                    chunk_size,
                    flags: 0,
                };
                self.out.put(&msg.encode());
                self.unresolved_needy += 1;
                self.unresolved.push_back(Announced {
                    seq,
                    size,
                    tag,
                    token,
                    inline: false,
                    needs_post: true,
                });
            }
        }
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Matches announced messages to the receiver's posts, then announces
    /// what the eager window now admits, until neither moves.
    fn resolve(&mut self, ev: &mut impl FnMut(SendEvent)) {
        loop {
            let mut moved = false;
            while let Some(a) = self.unresolved.front() {
                let Some(out) = self.posts.assign(a.size, a.tag) else {
                    break;
                };
                moved = true;
                let Some(a) = self.unresolved.pop_front() else {
                    break;
                };
                if a.inline {
                    self.uncovered -= eager_cost(a.size);
                }
                if !a.needs_post {
                    // Its fate is the receiver's request to report.
                    continue;
                }
                self.unresolved_needy -= 1;
                if a.inline {
                    self.unresolved_lone -= 1;
                    self.lone_step(a.token, out.verdict == Verdict::Accept, ev);
                }
                match out.verdict {
                    Verdict::Accept if a.inline => {}
                    Verdict::Accept => {
                        self.awaiting_ack.insert(a.seq, a.token);
                        ev(SendEvent::Start {
                            token: a.token,
                            seq: a.seq,
                        });
                    }
                    Verdict::Truncated { buffer } => ev(SendEvent::Refused {
                        token: a.token,
                        err: Error::Truncated {
                            tag: a.tag,
                            message: a.size,
                            buffer,
                        },
                    }),
                    Verdict::Mismatch => ev(SendEvent::Refused {
                        token: a.token,
                        err: Error::TagMismatch(a.tag),
                    }),
                }
            }
            while let Some(q) = self.queued.front() {
                let admit = match q {
                    Queued::Inline { payload, .. } => self.fits(payload.len() as u64),
                    Queued::Chunked { .. } => true,
                };
                if !admit {
                    break;
                }
                if let Some(q) = self.queued.pop_front() {
                    self.announce(q);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Where the next read from the control socket goes.
    pub fn inbox_space(&mut self) -> &mut [u8] {
        self.inbox.space()
    }

    /// `n` bytes were read into `inbox_space()` (0 = the peer closed).
    pub fn received(&mut self, n: usize, now: Instant, ev: &mut impl FnMut(SendEvent)) {
        if self.broken.is_some() {
            return;
        }
        if n == 0 {
            self.fail(Error::ConnectionLost(
                "the receiver closed the control connection".into(),
            ));
            return;
        }
        self.live.heard(now);
        self.inbox.filled(n);
        loop {
            let (frame, len) = match self.inbox.peek() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return self.fail(e),
            };
            self.inbox.consume(len);
            if let Err(e) = self.on_frame(frame, ev) {
                return self.fail(e);
            }
        }
        self.resolve(ev);
    }

    fn on_frame(&mut self, f: Frame, ev: &mut impl FnMut(SendEvent)) -> Result<()> {
        match f {
            Frame::Post(p) => {
                if p.post_seq != self.next_post {
                    return Err(Error::Protocol(format!(
                        "receive {} posted, expected {}",
                        p.post_seq, self.next_post
                    )));
                }
                if self.posts.len() >= MAX_OPEN_POSTS {
                    return Err(Error::Protocol(format!(
                        "more than {MAX_OPEN_POSTS} receives posted ahead"
                    )));
                }
                self.next_post += 1;
                self.posts.push((), &p.bufs);
                self.resolve(ev);
            }
            Frame::Ack(a) => match self.awaiting_ack.remove(&a.seq) {
                Some(token) => ev(SendEvent::Acked(token)),
                None => {
                    return Err(Error::Protocol(format!(
                        "acknowledgement of message {} that awaits none",
                        a.seq
                    )))
                }
            },
            Frame::Ping(_) => {}
            Frame::Placed(p) => {
                if p.seq >= self.next_seq {
                    return Err(Error::Protocol(format!(
                        "chunks in place of message {}, which was never announced",
                        p.seq
                    )));
                }
                ev(SendEvent::Placed(p))
            }
            Frame::Dial(d) => ev(SendEvent::Dial(d)),
            Frame::Bye => return Err(Error::PeerClosed),
            Frame::Msg { msg, .. } => {
                return Err(Error::Protocol(format!(
                    "message {} announced to its sender",
                    msg.seq
                )))
            }
            Frame::Retire(_) => {
                return Err(Error::Protocol(
                    "a data socket retired by the receiver".into(),
                ))
            }
        }
        Ok(())
    }

    /// Data socket `index` of generation `gen` is out of use: the
    /// receiver closes its end and says which chunks are in place.
    pub fn retire(&mut self, index: u16, gen: u32) {
        if self.broken.is_none() {
            self.out.put(
                &Retire {
                    index,
                    generation: gen,
                }
                .encode(),
            );
        }
    }

    /// Says goodbye: the last frame before the comm closes on purpose.
    pub fn bye(&mut self) {
        if self.broken.is_none() {
            self.out.put(&Bye.encode());
        }
    }

    /// Timers: gives up on a silent peer, sends a heartbeat when quiet.
    pub fn poll(&mut self, now: Instant) {
        if self.broken.is_some() {
            return;
        }
        if let Err(e) = self.live.check(now) {
            return self.fail(e);
        }
        if self.out.is_empty() {
            if let Some(count) = self.live.ping_due(now) {
                self.out.put(&Ping { count }.encode());
            }
        }
    }

    /// When timers next need the comm (`None`: never).
    pub fn due(&self) -> Option<Instant> {
        self.live.due()
    }

    /// Bytes to write to the control socket.
    pub fn output(&self) -> &[u8] {
        self.out.pending()
    }

    /// The kernel took `n` bytes of `output()`.
    pub fn wrote(&mut self, n: usize, now: Instant, ev: &mut impl FnMut(SendEvent)) {
        if n == 0 {
            return;
        }
        self.out.wrote(n);
        self.live.spoke(now);
        let written = self.out.written();
        while let Some(&(end, token, lone)) = self.writing.front() {
            if end > written {
                break;
            }
            self.writing.pop_front();
            if !lone {
                ev(SendEvent::Written(token));
                continue;
            }
            match self.lone.remove(&token) {
                Some(Lone::Matched) => ev(SendEvent::Written(token)),
                Some(Lone::Refused) => {}
                _ => {
                    self.lone.insert(token, Lone::Written);
                }
            }
        }
    }

    /// Lone message `token` met its receive (`accepted`, else refused: the
    /// caller reports why); `Written` once it is also written.
    fn lone_step(&mut self, token: Token, accepted: bool, ev: &mut impl FnMut(SendEvent)) {
        match (self.lone.remove(&token), accepted) {
            (Some(Lone::Written), true) => ev(SendEvent::Written(token)),
            (Some(Lone::Written), false) => {}
            (_, true) => {
                self.lone.insert(token, Lone::Matched);
            }
            (_, false) => {
                self.lone.insert(token, Lone::Refused);
            }
        }
    }

    /// The counts of messages that need their receive's Post agree with
    /// what `unresolved` holds.
    #[cfg(test)]
    pub fn counts_agree(&self) -> bool {
        let needy = self.unresolved.iter().filter(|a| a.needs_post);
        self.unresolved_needy == needy.clone().count()
            && self.unresolved_lone == needy.filter(|a| a.inline).count()
    }

    /// Whether control bytes from the receiver are awaited now: a chunked
    /// or lone message needs its receive, an acknowledgement, or the window room.
    pub fn awaits_peer(&self) -> bool {
        self.moves_on_peer() || self.unresolved_lone > 0
    }

    /// Whether the receiver's control bytes would move anything without
    /// its owner calling in: chunks leave on a Post, requests complete on
    /// an Ack, queued messages on window room. A lone message only learns
    /// its fate from its Post, which the owner's next test reads, so it
    /// needs no watch: woken for it, a progress thread ran once per lone
    /// message, and the Post's sender paid the wake-up in its send.
    pub fn moves_on_peer(&self) -> bool {
        !self.awaiting_ack.is_empty()
            || !self.queued.is_empty()
            || self.unresolved_needy > self.unresolved_lone
            || self.uncovered >= EAGER_WINDOW / 2
    }
}
