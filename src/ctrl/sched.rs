//! Which chunk a sending comm's data socket carries next, sans I/O.
//!
//! Work-conserving: a socket asks for its next chunk when it can take one
//! (the kernel has room under its TCP_NOTSENT_LOWAT), so a fast socket
//! carries more than a slow one. Each socket reports how far the peer's
//! TCP acknowledged its byte stream; from that the scheduler learns each
//! NIC's delivery rate (while one of its sockets has bytes outstanding; a
//! socket's rate is an even share of its NIC's; forgotten a second after
//! its last sample) and which of a socket's chunks are still on the way.
//!
//! When a message starts, its chunks are dealt to home sockets in
//! proportion to their rates (smooth weighted round robin, so equal
//! sockets alternate as static striping would, and the receiver's threads
//! share the work); a message is then due on every socket at about the
//! same time. A socket takes its own chunks, oldest message first, but
//! one that another socket would deliver (after its backlog and its own
//! chunks so far) in under half the time becomes that one's: a slow
//! socket does not hoard a message's tail, and is left the later
//! messages' chunks. With none left a socket takes the last chunk of a
//! socket that would finish much later than itself (a dead one first), so
//! misjudged rates cost little. Last, it copies a chunk that another
//! socket holds and has not begun to deliver, if it would deliver it in
//! under half the time (a message's tail behind a slow path's backlog);
//! the receiver keeps the first copy and the slow socket skips its own if
//! the message is in place before it begins.
//!
//! A socket stalls when it has bytes outstanding and no acknowledgement for
//! the stall timeout, and another socket advanced meanwhile and is not
//! stuck itself (a frozen peer stops every socket with bytes outstanding). A stalled or failed
//! socket is retired: its chunks on the way are queued again, and the
//! receiver's answer to the retirement (which chunks are in place) queues
//! the rest it lacks.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::wire::CHUNK_LEN;

/// A chunk handed to a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Assign<M> {
    pub m: M,
    pub seq: u64,
    /// Chunk index in the message.
    pub k: u64,
    /// A re-send (after a retirement) or a copy (of a message's tail).
    pub again: bool,
}

/// Why a socket was taken out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Why {
    /// Bytes outstanding and unacknowledged for the stall timeout while
    /// another socket advanced.
    Stalled,
    /// Its socket failed.
    Failed(Error),
}

/// A socket taken out, for the comm to act on (tell the peer, close it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Retired {
    pub index: usize,
    pub gen: u32,
    pub why: Why,
    /// Chunks queued again at once (those it had on the way).
    pub requeued: usize,
}

/// A socket expected to take longer than this to deliver a chunk is
/// slow enough for an idle one to consider taking or copying its chunks:
/// those are woken when it takes one.
const SLOW: Duration = Duration::from_millis(2);

/// A chunk is copied only if its socket would take longer than this to
/// deliver it: a copy costs the receiver a wait when both copies arrive
/// together, so paths that keep up (a chunk in well under a millisecond)
/// never copy each other.
const COPY_LATER: Duration = Duration::from_millis(5);

/// Sockets within this fraction of the best rate get chunks evenly.
const EVEN: f64 = 0.7;

/// A NIC's rate is forgotten when it was last measured this long ago. A
/// rate is measured only while the NIC has chunks outstanding, so one
/// measured in a bad moment (a link down while its chunks waited, not long
/// enough to stall) would leave it dealt next to nothing, never measured
/// again: idle for good. Forgotten, it is dealt as the best and measured anew.
const RATE_TTL: Duration = Duration::from_secs(1);

/// Shortest interval a rate is measured over: a rate-limited path
/// delivers in bursts, so 1 ms samples swing several-fold (and longer
/// ones miss the short busy spells of one message at a time).
const RATE_WINDOW: Duration = Duration::from_millis(10);

struct TxState<M> {
    seq: u64,
    m: M,
    size: u64,
    chunk_size: u64,
    /// Chunks that went out at least once (one bit each).
    taken: Vec<u64>,
    /// Per socket: its home chunks not taken yet, in order (it takes from
    /// the front, a thief from the back).
    homes: Vec<VecDeque<u32>>,
    again: VecDeque<u64>,
    /// Chunks copied by an idle socket (one copy each at most).
    copied: HashSet<u64>,
    /// Copies allowed (no per-thread staging behind the message's memory).
    copyable: bool,
}

impl<M> TxState<M> {
    fn n_chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    fn len(&self, k: u64) -> u64 {
        (self.size - k * self.chunk_size).min(self.chunk_size)
    }

    fn was_taken(&self, k: u64) -> bool {
        self.taken[(k / 64) as usize] & (1 << (k % 64)) != 0
    }

    fn take(&mut self, k: u64) {
        self.taken[(k / 64) as usize] |= 1 << (k % 64);
    }

    fn queue_again(&mut self, k: u64) -> bool {
        if k >= self.n_chunks() || !self.was_taken(k) || self.again.contains(&k) {
            return false;
        }
        self.again.push_back(k);
        true
    }
}

/// A chunk on the way on a socket: its place in the socket's byte stream.
#[derive(Debug, Clone, Copy)]
struct Out {
    seq: u64,
    k: u64,
    start: u64,
    end: u64,
}

#[derive(Debug)]
struct Slot {
    live: bool,
    gen: u32,
    /// Its NIC: a copy on a socket of the same NIC competes with the first.
    nic: usize,
    /// The socket's stream end (written plus queued), as it last said.
    end: u64,
    /// Stream bytes the peer acknowledged, as last sampled.
    acked: u64,
    out: VecDeque<Out>,
    /// When `acked` last advanced, or the socket last went from idle to busy.
    since: Instant,
    /// When `acked` last advanced.
    advanced: Option<Instant>,
    /// Weight of the smooth weighted round robin that deals chunks.
    deal: f64,
}

impl Slot {
    fn fresh(gen: u32, nic: usize, now: Instant) -> Self {
        Slot {
            live: true,
            gen,
            nic,
            end: 0,
            acked: 0,
            out: VecDeque::new(),
            since: now,
            advanced: None,
            deal: 0.0,
        }
    }

    fn busy(&self) -> bool {
        self.acked < self.end
    }

    fn backlog(&self) -> u64 {
        self.end - self.acked
    }

    /// The socket's stream end and acknowledged bytes, at `now`; returns
    /// how far `acked` advanced.
    fn note(&mut self, acked: u64, end: u64, now: Instant) -> u64 {
        let was_busy = self.busy();
        let advanced = acked.saturating_sub(self.acked);
        if advanced > 0 {
            self.acked = acked;
            self.since = now;
            self.advanced = Some(now);
        }
        self.end = end.max(self.acked);
        if !was_busy && self.busy() {
            self.since = now;
        }
        while self.out.front().is_some_and(|o| o.end <= self.acked) {
            self.out.pop_front();
        }
        advanced
    }
}

/// A NIC's delivery rate. Its sockets share its bandwidth, and how TCP
/// splits it between them changes all the time: measured per socket, rates
/// swing several-fold (and a rate-limited path delivers in bursts), so
/// chunks would follow noise.
#[derive(Debug, Default)]
struct Nic {
    /// Bytes its sockets' peers acknowledged.
    acked: u64,
    /// Bytes/s measured while one of its sockets was busy; `None` until known.
    rate: Option<f64>,
    /// Start of the busy interval being measured: (time, acked).
    mark: Option<(Instant, u64)>,
    /// When `rate` was last updated.
    measured: Option<Instant>,
}

impl Nic {
    /// The rate, unless it is older than `RATE_TTL` at `now`.
    fn rate(&self, now: Instant) -> Option<f64> {
        let fresh = self
            .measured
            .is_some_and(|t| now.saturating_duration_since(t) < RATE_TTL);
        self.rate.filter(|_| fresh)
    }

    fn note(&mut self, advanced: u64, busy: bool, now: Instant) {
        self.acked += advanced;
        // A rate counts only time the NIC had bytes outstanding: one that
        // went idle meanwhile (when, is unknown) gives no sample.
        match self.mark {
            Some(_) if !busy => self.mark = None,
            Some((t, a)) => {
                let dt = now.saturating_duration_since(t);
                if dt >= RATE_WINDOW {
                    let r = (self.acked - a) as f64 / dt.as_secs_f64();
                    self.rate = Some(self.rate.map_or(r, |old| 0.75 * old + 0.25 * r));
                    self.mark = Some((now, self.acked));
                    self.measured = Some(now);
                }
            }
            None if busy => self.mark = Some((now, self.acked)),
            None => {}
        }
    }
}

pub(crate) struct Sched<M> {
    /// Started and not yet acknowledged, oldest first.
    msgs: VecDeque<TxState<M>>,
    slots: Vec<Slot>,
    /// Indexed by the sockets' `nic`.
    nics: Vec<Nic>,
    stall: Option<Duration>,
    retired: Vec<Retired>,
    /// Sockets that asked and got nothing since: woken when work comes.
    hungry: Vec<bool>,
    /// The latest time a socket reported (rates age by it).
    clock: Instant,
    /// Hungry sockets that work came for, for the comm to wake.
    woken: Vec<usize>,
}

impl<M: Clone> Sched<M> {
    /// One socket per entry of `nics` (its NIC), all live, of generation
    /// 0; `stall`: `None` never retires a socket for stalling.
    pub fn new(nics: &[usize], stall: Option<Duration>, now: Instant) -> Self {
        Sched {
            msgs: VecDeque::new(),
            slots: nics.iter().map(|&nic| Slot::fresh(0, nic, now)).collect(),
            nics: (0..=nics.iter().copied().max().unwrap_or(0))
                .map(|_| Nic::default())
                .collect(),
            stall,
            retired: Vec::new(),
            // Sockets begin waiting for work.
            hungry: vec![true; nics.len()],
            woken: Vec::new(),
            clock: now,
        }
    }

    /// Per socket: its share of its NIC's rate (an even split among the
    /// NIC's live sockets), if the NIC's rate is known; and the best share.
    fn shares(&self) -> (Vec<Option<f64>>, f64) {
        let mut live = vec![0usize; self.nics.len()];
        for s in self.slots.iter().filter(|s| s.live) {
            live[s.nic] += 1;
        }
        let shares: Vec<Option<f64>> = self
            .slots
            .iter()
            .map(|s| {
                self.nics[s.nic]
                    .rate(self.clock)
                    .map(|r| r / live[s.nic].max(1) as f64)
            })
            .collect();
        let best = shares.iter().flatten().fold(0.0, |a, &b| f64::max(a, b));
        (shares, best)
    }

    /// Per socket: its rate (its share), or the best known (an unmeasured
    /// NIC is assumed as good as the best: it is measured once it carries
    /// some). `None` while no rate is known: then none is taken for slow,
    /// and chunks are dealt evenly.
    fn rates(&self) -> Vec<Option<f64>> {
        let (shares, best) = self.shares();
        shares
            .into_iter()
            .map(|s| match s {
                Some(r) if r > 0.0 => Some(r),
                _ if best > 0.0 => Some(best),
                _ => None,
            })
            .collect()
    }

    /// A socket's share of dealt chunks: its rate, if below `EVEN` of the
    /// best; else even with the best (rates of sockets that keep up vary
    /// with load, and dealing should not follow that noise).
    fn weight((shares, best): &(Vec<Option<f64>>, f64), i: usize) -> f64 {
        match shares[i] {
            Some(r) if r < EVEN * best => r / best,
            _ => 1.0,
        }
    }

    /// Message `seq` may go: `size` bytes in chunks of `chunk_size`;
    /// `copyable`: idle sockets may copy its chunks still on the way.
    pub fn start(&mut self, seq: u64, m: M, size: u64, chunk_size: u64, copyable: bool) {
        let chunk_size = chunk_size.max(1);
        let n = size.div_ceil(chunk_size);
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].live)
            .collect();
        let shares = self.shares();
        let weights: Vec<f64> = live.iter().map(|&i| Self::weight(&shares, i)).collect();
        let total: f64 = weights.iter().sum();
        let mut homes: Vec<VecDeque<u32>> = vec![VecDeque::new(); self.slots.len()];
        for k in 0..n {
            // Smooth weighted round robin: each socket gains its weight, the
            // most ahead takes the chunk and pays the total.
            let mut best = None;
            for (j, &i) in live.iter().enumerate() {
                let s = &mut self.slots[i];
                s.deal += weights[j];
                if best.is_none_or(|(b, _)| s.deal > b) {
                    best = Some((s.deal, i));
                }
            }
            let Some((_, i)) = best else { break };
            self.slots[i].deal -= total;
            homes[i].push_back(k as u32);
        }
        let has_home: Vec<bool> = homes.iter().map(|h| !h.is_empty()).collect();
        let slow = (0..self.slots.len()).any(|j| {
            has_home[j] && self.eta(j, homes[j].len() as u64 * chunk_size) > SLOW.as_secs_f64()
        });
        self.wake(|i| has_home[i] || slow);
        self.msgs.push_back(TxState {
            seq,
            m,
            size,
            chunk_size,
            taken: vec![0; n.div_ceil(64) as usize],
            homes,
            again: VecDeque::new(),
            copied: HashSet::new(),
            copyable,
        });
    }

    /// Every chunk of `seq` is in place: it needs no more sending.
    pub fn acked(&mut self, seq: u64) -> Option<M> {
        let i = self.msgs.iter().position(|t| t.seq == seq)?;
        for s in &mut self.slots {
            s.out.retain(|o| o.seq != seq);
        }
        self.msgs.remove(i).map(|t| t.m)
    }

    /// Messages not yet acknowledged.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.msgs.len()
    }

    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.live).count()
    }

    pub fn is_live(&self, index: usize, gen: u32) -> bool {
        self.slots
            .get(index)
            .is_some_and(|s| s.live && s.gen == gen)
    }

    #[cfg(test)]
    pub fn generation(&self, index: usize) -> Option<u32> {
        self.slots.get(index).map(|s| s.gen)
    }

    /// Hungry sockets for which `which` says work came: marked to wake.
    fn wake(&mut self, which: impl Fn(usize) -> bool) {
        for i in 0..self.slots.len() {
            if self.hungry[i] && self.slots[i].live && which(i) {
                self.hungry[i] = false;
                self.woken.push(i);
            }
        }
    }

    /// Sockets that asked, found nothing, and may find something now: the
    /// comm wakes them.
    pub fn take_woken(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.woken)
    }

    /// Socket `i`'s stream end and acknowledged bytes, at `now`, and so
    /// its NIC's.
    fn note(&mut self, i: usize, acked: u64, end: u64, now: Instant) {
        self.clock = self.clock.max(now);
        let advanced = self.slots[i].note(acked, end, now);
        let nic = self.slots[i].nic;
        let busy = self
            .slots
            .iter()
            .any(|s| s.live && s.nic == nic && s.busy());
        self.nics[nic].note(advanced, busy, now);
    }

    /// How long socket `i` would take to deliver `bytes` more.
    fn eta(&self, i: usize, bytes: u64) -> f64 {
        self.rates()[i].map_or(0.0, |r| (self.slots[i].backlog() + bytes) as f64 / r)
    }

    /// What socket `index` (of `gen`) sends next; its stream ends at
    /// `end` and the peer acknowledged `acked` bytes of it. `None`: nothing
    /// (or the socket was retired).
    pub fn pull(
        &mut self,
        index: usize,
        gen: u32,
        acked: u64,
        end: u64,
        now: Instant,
    ) -> Option<Assign<M>> {
        if !self.is_live(index, gen) {
            return None;
        }
        self.note(index, acked, end, now);
        let Some((a, len)) = self.next_chunk(index, now) else {
            self.hungry[index] = true;
            return None;
        };
        self.hungry[index] = false;
        let s = &mut self.slots[index];
        let start = s.end;
        let stop = start + CHUNK_LEN as u64 + len;
        s.out.push_back(Out {
            seq: a.seq,
            k: a.k,
            start,
            end: stop,
        });
        let acked = s.acked;
        self.note(index, acked, stop, now);
        // A slow socket took it: sockets of other NICs with nothing to do
        // look whether they should take over or copy.
        if self.eta(index, 0) > SLOW.as_secs_f64() {
            let nic = self.slots[index].nic;
            let nics: Vec<usize> = self.slots.iter().map(|s| s.nic).collect();
            self.wake(|i| nics[i] != nic);
        }
        Some(a)
    }

    /// For socket `index`, oldest message first: a re-send; else its own
    /// next chunk, unless a live socket would deliver it in under half the
    /// time and over `SLOW` sooner (then it is that one's, woken if
    /// hungry); else the last chunk of the socket that would finish its
    /// own latest, if in over twice the time this one would and over
    /// `SLOW` (a gone socket's first);
    /// else a copy of a chunk a socket of another NIC at under half this
    /// one's rate holds, not begun to arrive, that this one would deliver
    /// in under half the time, if that socket would take over `COPY_LATER`
    /// (or that a stalled-looking socket holds).
    fn next_chunk(&mut self, index: usize, now: Instant) -> Option<(Assign<M>, u64)> {
        // Without rates, times are unknown: no socket counts as slow.
        let rates: Vec<f64> = self
            .rates()
            .into_iter()
            .map(|r| r.unwrap_or(f64::INFINITY))
            .collect();
        let half = self.stall.map(|s| s / 2);
        let Sched {
            msgs,
            slots,
            hungry,
            woken,
            ..
        } = self;
        // Per socket: bytes of its own chunks left in the messages so far,
        // which it carries before it could take another's.
        let mut ahead = vec![0u64; slots.len()];
        for t in msgs.iter_mut() {
            for (j, h) in t.homes.iter().enumerate() {
                ahead[j] += h.len() as u64 * t.chunk_size;
            }
            let c = t.chunk_size as f64;
            let mine = (slots[index].backlog() as f64 + c) / rates[index];
            let mut pick = t.again.pop_front().map(|k| (k, true));
            // Earliest completion: a chunk another socket would deliver
            // (after its backlog and own chunks so far) in under half the
            // time and over `SLOW` sooner is that one's instead, so no slow
            // socket hoards a message's tail.
            while pick.is_none() && !t.homes[index].is_empty() {
                let sooner = (0..slots.len())
                    .filter(|&j| j != index && slots[j].live)
                    .map(|j| {
                        let at = (slots[j].backlog() + ahead[j]) as f64 + c;
                        (at / rates[j], j)
                    })
                    .filter(|&(at, _)| 2.0 * at < mine && at + SLOW.as_secs_f64() < mine)
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                let Some(k) = t.homes[index].pop_front() else {
                    break;
                };
                match sooner {
                    Some((_, j)) => {
                        t.homes[j].push_back(k);
                        ahead[index] -= t.chunk_size;
                        ahead[j] += t.chunk_size;
                        if hungry[j] {
                            hungry[j] = false;
                            woken.push(j);
                        }
                    }
                    None => {
                        ahead[index] -= t.chunk_size;
                        pick = Some((k as u64, false));
                    }
                }
            }
            if pick.is_none() {
                let mut best: Option<(f64, usize)> = None;
                for (j, h) in t.homes.iter().enumerate() {
                    if h.is_empty() || j == index {
                        continue;
                    }
                    let finish = if slots[j].live {
                        (slots[j].backlog() as f64 + h.len() as f64 * c) / rates[j]
                    } else {
                        f64::INFINITY
                    };
                    // Sockets that keep up leave each other's chunks alone:
                    // their receiving threads share the work that way.
                    let worth = finish > 2.0 * mine && finish > SLOW.as_secs_f64();
                    if worth && best.is_none_or(|(b, _)| finish > b) {
                        best = Some((finish, j));
                    }
                }
                if let Some((_, j)) = best {
                    pick = t.homes[j].pop_back().map(|k| (k as u64, false));
                    ahead[j] -= t.chunk_size;
                }
            }
            if pick.is_none() && t.copyable {
                let mut best: Option<(f64, u64)> = None;
                for (j, s) in slots.iter().enumerate() {
                    if j == index || !s.live {
                        continue;
                    }
                    let stuck = half.is_some_and(|h| now.saturating_duration_since(s.since) >= h);
                    let other_nic = s.nic != slots[index].nic;
                    for o in s
                        .out
                        .iter()
                        .filter(|o| o.seq == t.seq && !t.copied.contains(&o.k))
                    {
                        let left = if stuck {
                            f64::INFINITY
                        } else if other_nic && o.start >= s.acked {
                            (o.end - s.acked) as f64 / rates[j]
                        } else {
                            continue;
                        };
                        // A clearly slower path, a chunk long to come.
                        let slower = stuck || 2.0 * rates[j] < rates[index];
                        let worth = slower && left > 2.0 * mine && left > COPY_LATER.as_secs_f64();
                        if worth && best.is_none_or(|(b, _)| left > b) {
                            best = Some((left, o.k));
                        }
                    }
                }
                if let Some((_, k)) = best {
                    t.copied.insert(k);
                    pick = Some((k, true));
                }
            }
            if let Some((k, again)) = pick {
                if !again {
                    t.take(k);
                }
                let len = t.len(k);
                return Some((
                    Assign {
                        m: t.m.clone(),
                        seq: t.seq,
                        k,
                        again,
                    },
                    len,
                ));
            }
        }
        None
    }

    /// What socket `index` (of `gen`) last published about its stream
    /// (as `pull`'s arguments), so choices see every socket as it is now.
    pub fn view(&mut self, index: usize, gen: u32, acked: u64, end: u64, now: Instant) {
        if self.is_live(index, gen) {
            self.note(index, acked, end, now);
        }
    }

    /// A socket's periodic report (see `pull`); then retires sockets that
    /// stalled while another advanced.
    pub fn sample(&mut self, index: usize, gen: u32, acked: u64, end: u64, now: Instant) {
        if self.is_live(index, gen) {
            self.note(index, acked, end, now);
        }
        let Some(stall) = self.stall else { return };
        let stalled: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let s = &self.slots[i];
                s.live && s.busy() && now.saturating_duration_since(s.since) > stall
            })
            .collect();
        for i in stalled {
            // Another advanced since this one last did and is not stuck
            // itself: the peer reads. That one may have delivered all it had
            // long ago (the rest of a message waits on this one); a frozen
            // peer leaves every busy socket stuck.
            let since = self.slots[i].since;
            let others_advance = self.slots.iter().enumerate().any(|(j, p)| {
                j != i
                    && p.live
                    && p.advanced.is_some_and(|t| t > since)
                    && (!p.busy() || now.saturating_duration_since(p.since) <= stall)
            });
            if others_advance {
                self.retire(i, self.slots[i].gen, Why::Stalled);
            }
        }
    }

    /// Takes socket `index` (of `gen`) out: what it had on the way goes
    /// again. False if it was out already.
    pub fn retire(&mut self, index: usize, gen: u32, why: Why) -> bool {
        if !self.is_live(index, gen) {
            return false;
        }
        let s = &mut self.slots[index];
        s.live = false;
        let out: Vec<Out> = s.out.drain(..).collect();
        let mut requeued = 0;
        for o in out {
            if let Some(t) = self.msgs.iter_mut().find(|t| t.seq == o.seq) {
                requeued += t.queue_again(o.k) as usize;
            }
        }
        self.retired.push(Retired {
            index,
            gen,
            why,
            requeued,
        });
        self.wake(|_| true);
        true
    }

    /// Whether a retirement waits for the comm.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Retirements the comm has not acted on yet.
    pub fn take_retired(&mut self) -> Vec<Retired> {
        std::mem::take(&mut self.retired)
    }

    /// The receiver's answer to a retirement: bit `j` of `bits[b]` says
    /// chunk `first + 8b + j` of `seq` is in place. Chunks that went out,
    /// are not in place, and are neither queued nor on the way on a live
    /// socket go again. Returns how many.
    pub fn placed(&mut self, seq: u64, first: u64, bits: &[u8]) -> usize {
        let Some(t) = self.msgs.iter_mut().find(|t| t.seq == seq) else {
            return 0;
        };
        let on_the_way: HashSet<u64> = self
            .slots
            .iter()
            .filter(|s| s.live)
            .flat_map(|s| s.out.iter())
            .filter(|o| o.seq == seq)
            .map(|o| o.k)
            .collect();
        let mut n = 0;
        for (b, byte) in bits.iter().enumerate() {
            for j in 0..8 {
                let k = first + 8 * b as u64 + j;
                if byte & (1 << j) == 0 && !on_the_way.contains(&k) {
                    n += t.queue_again(k) as usize;
                }
            }
        }
        if n > 0 {
            self.wake(|_| true);
        }
        n
    }

    /// Socket `index` is back (reconnected) as `gen`: a fresh stream.
    pub fn revive(&mut self, index: usize, gen: u32, now: Instant) {
        if let Some(s) = self.slots.get_mut(index) {
            *s = Slot::fresh(gen, s.nic, now);
            self.hungry[index] = true;
        }
    }

    /// Drops every message (the comm failed).
    pub fn clear(&mut self) {
        self.msgs.clear();
        for s in &mut self.slots {
            s.out.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);
    const H: u64 = CHUNK_LEN as u64;

    /// Socket `i`'s view: its stream end and acknowledged bytes.
    #[derive(Default, Clone, Copy)]
    struct Sock {
        end: u64,
        acked: u64,
    }

    fn pull(
        s: &mut Sched<u32>,
        socks: &mut [Sock],
        i: usize,
        now: Instant,
    ) -> Option<(u64, u64, bool)> {
        pull_gen(s, socks, i, 0, now)
    }

    fn pull_gen(
        s: &mut Sched<u32>,
        socks: &mut [Sock],
        i: usize,
        gen: u32,
        now: Instant,
    ) -> Option<(u64, u64, bool)> {
        let a = s.pull(i, gen, socks[i].acked, socks[i].end, now)?;
        socks[i].end += H + 4096;
        Some((a.seq, a.k, a.again))
    }

    #[test]
    fn sockets_that_keep_up_share_chunks_in_turn_across_messages() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 1], None, t0);
        s.start(0, 10, 3 * 4096, 4096, true);
        s.start(1, 11, 3 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        // Socket 1 asks three times in a row: it gets its own chunks, of
        // the oldest message first, and leaves socket 0's alone.
        let got: Vec<_> = (0..3).map(|_| pull(&mut s, &mut k, 1, t0)).collect();
        assert_eq!(
            got,
            vec![
                Some((0, 1, false)),
                Some((1, 0, false)),
                Some((1, 2, false))
            ]
        );
        // Dealing goes on where the last message ended: socket 0 has chunks
        // 0 and 2 of message 0, and 1 of message 1.
        let got: Vec<_> = (0..4).map(|_| pull(&mut s, &mut k, 0, t0)).collect();
        assert_eq!(
            got,
            vec![
                Some((0, 0, false)),
                Some((0, 2, false)),
                Some((1, 1, false)),
                None
            ]
        );
        assert_eq!(s.acked(0), Some(10));
        assert_eq!(s.acked(0), None);
        assert_eq!(s.active(), 1);
    }

    #[test]
    fn a_socket_that_falls_behind_gives_its_chunks_to_one_that_keeps_up() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 1], None, t0);
        s.start(0, 0, 8 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        assert_eq!(pull(&mut s, &mut k, 0, t0), Some((0, 0, false)));
        assert_eq!(pull(&mut s, &mut k, 0, t0), Some((0, 2, false)));
        // Socket 0 holds two chunks nobody acknowledged yet; socket 1
        // carries its own first, a hundred times faster.
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 1, false)));
        let t1 = t0 + 10 * MS;
        k[0].acked = 40;
        s.sample(0, 0, k[0].acked, k[0].end, t1);
        k[1].acked = k[1].end - 1;
        s.sample(1, 0, k[1].acked, k[1].end, t1);
        k[1].acked = k[1].end;
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 3, false)));
        k[1].acked = k[1].end;
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 5, false)));
        k[1].acked = k[1].end;
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 7, false)));
        k[1].acked = k[1].end;
        // Now socket 1 has carried all of its own and socket 0 would
        // finish later: socket 1 takes socket 0's last ones.
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 6, false)));
        k[1].acked = k[1].end;
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 4, false)));
        assert_eq!(pull(&mut s, &mut k, 0, t0), None, "nothing left");
        // A socket that is gone, busy or not, leaves its chunks to anyone.
        s.acked(0);
        s.start(1, 1, 4 * 4096, 4096, true);
        s.retire(0, 0, Why::Failed(Error::Closed));
        let got: Vec<_> = (0..4).map(|_| pull(&mut s, &mut k, 1, t0)).collect();
        assert!(got
            .iter()
            .all(|g| g.is_some_and(|(seq, _, again)| seq == 1 && !again)));
    }

    /// Two sockets that each took a chunk at `t0`; in 10 ms socket 0
    /// delivered its chunk but a byte, socket 1 `acked1` of its bytes.
    fn measured(t0: Instant, acked1: impl Fn(u64) -> u64) -> (Sched<u32>, [Sock; 2]) {
        let mut s = Sched::new(&[0, 1], None, t0);
        s.start(0, 0, 2 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        pull(&mut s, &mut k, 0, t0);
        pull(&mut s, &mut k, 1, t0);
        k[0].acked = k[0].end - 1;
        k[1].acked = acked1(k[1].end);
        s.sample(0, 0, k[0].acked, k[0].end, t0 + 10 * MS);
        s.sample(1, 0, k[1].acked, k[1].end, t0 + 10 * MS);
        s.acked(0);
        (s, k)
    }

    #[test]
    fn chunks_are_dealt_in_proportion_to_measured_rates() {
        let t0 = Instant::now();
        let (mut s, _) = measured(t0, |end| end / 10);
        s.start(1, 1, 110 * 4096, 4096, true);
        let homes: Vec<usize> = s.msgs[0].homes.iter().map(|h| h.len()).collect();
        assert_eq!(homes, vec![100, 10]);
        // Equal sockets alternate, whatever the message size.
        let mut e = Sched::new(&[0, 1, 2], None, t0);
        for seq in 0..3 {
            e.start(seq, 0, 4096, 4096, true);
        }
        let first: Vec<usize> = e
            .msgs
            .iter()
            .map(|t| t.homes.iter().position(|h| !h.is_empty()).unwrap())
            .collect();
        assert_eq!(first, vec![0, 1, 2]);
    }

    #[test]
    fn a_nic_measured_near_zero_is_measured_again_a_second_later() {
        let t0 = Instant::now();
        // Socket 1's chunk waited out a link down: one byte in 10 ms.
        let (mut s, mut k) = measured(t0, |_| 1);
        s.start(1, 1, 66 * 4096, 4096, true);
        let homes: Vec<usize> = s.msgs[0].homes.iter().map(|h| h.len()).collect();
        assert_eq!(homes, vec![66, 0]);
        // A second later, socket 0 still busy and measured, socket 1 idle:
        // its rate is forgotten, and it is dealt as the best.
        for ms in [20, 500, 1000, 1011] {
            k[0].acked += 4096;
            s.sample(0, 0, k[0].acked, k[0].end + 66 * 4096, t0 + ms * MS);
        }
        s.start(2, 2, 66 * 4096, 4096, true);
        let homes: Vec<usize> = s.msgs[1].homes.iter().map(|h| h.len()).collect();
        assert_eq!(homes, vec![33, 33]);
    }

    #[test]
    fn sockets_of_one_nic_share_its_rate_however_tcp_splits_it() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 0, 1], None, t0);
        s.start(0, 0, 6 * 4096, 4096, true);
        let mut k = [Sock::default(); 3];
        for i in [0, 0, 1, 1, 2, 2] {
            pull(&mut s, &mut k, i, t0);
        }
        // In 10 ms NIC 0 delivered two chunks (but a byte), all on socket
        // 0, and NIC 1 one: per socket, socket 1 would look dead.
        let t1 = t0 + 10 * MS;
        k[0].acked = k[0].end - 1;
        k[2].acked = k[2].end / 2;
        for (i, sock) in k.iter().enumerate() {
            s.sample(i, 0, sock.acked, sock.end, t1);
        }
        s.acked(0);
        s.start(1, 1, 30 * 4096, 4096, true);
        let homes: Vec<usize> = s.msgs[0].homes.iter().map(|h| h.len()).collect();
        assert_eq!(homes, vec![10, 10, 10]);
    }

    #[test]
    fn a_slow_socket_leaves_its_chunk_to_one_that_would_deliver_it_much_sooner() {
        const C: u64 = 4096;
        // Socket 0 delivers a chunk in 10 ms, socket 1 in about 100 ms; of
        // an 11-chunk message socket 1 gets one. Socket 0 takes `took` of
        // its own first; then, with `fast` and `slow` bytes on the way on
        // sockets 0 and 1, socket 1 asks: it keeps its chunk unless socket
        // 0 would deliver it (after its backlog and its own chunks left) in
        // under half the time.
        for (took, fast, slow, keeps) in [
            // 0: 10 ahead, 110 ms; 1: 100 ms.
            (0, 0, 0, true),
            // 0: 60 ms, sooner but not in half the time.
            (5, 0, 0, true),
            // 0: idle, 10 ms.
            (10, 0, 0, false),
            // 0: 40 ms of backlog, 50 ms.
            (10, 4 * C, 0, true),
            (10, 3 * C, 0, false),
            // 0: 110 ms; 1: one chunk on the way, 200 ms: not half.
            (0, 0, C, true),
            // 1: two on the way, 300 ms.
            (0, 0, 2 * C, false),
        ] {
            let t0 = Instant::now();
            let mut s = Sched::new(&[0, 1], None, t0);
            s.start(0, 0, 2 * C, C, true);
            let mut k = [Sock::default(); 2];
            pull(&mut s, &mut k, 0, t0);
            pull(&mut s, &mut k, 1, t0);
            let t1 = t0 + 10 * MS;
            k[0].acked = C;
            k[1].acked = 410;
            for (i, sock) in k.iter().enumerate() {
                s.sample(i, 0, sock.acked, sock.end, t1);
            }
            s.acked(0);
            s.start(1, 1, 11 * C, C, true);
            let homes: Vec<usize> = s.msgs[0].homes.iter().map(|h| h.len()).collect();
            assert_eq!(homes, vec![10, 1]);
            let its = s.msgs[0].homes[1][0] as u64;
            for _ in 0..took {
                assert!(pull(&mut s, &mut k, 0, t1).is_some_and(|(_, k, _)| k != its));
            }
            for (i, backlog) in [(0, fast), (1, slow)] {
                k[i].acked = k[i].end;
                k[i].end += backlog;
                s.view(i, 0, k[i].acked, k[i].end, t1);
            }
            let row = (took, fast, slow);
            if keeps {
                assert_eq!(
                    pull(&mut s, &mut k, 1, t1),
                    Some((1, its, false)),
                    "{row:?}"
                );
            } else {
                assert_eq!(pull(&mut s, &mut k, 1, t1), None, "{row:?}");
                let got: Vec<_> = (0..11)
                    .filter_map(|_| pull(&mut s, &mut k, 0, t1))
                    .collect();
                assert_eq!(got.len(), 11 - took, "{row:?}");
                assert_eq!(
                    got.last(),
                    Some(&(1, its, false)),
                    "{row:?}: socket 0's now"
                );
            }
        }
    }

    #[test]
    fn a_stalled_socket_is_retired_once_another_advances_and_its_chunks_go_again() {
        let t0 = Instant::now();
        let stall = Some(1000 * MS);
        let mut s = Sched::new(&[0, 1], stall, t0);
        s.start(0, 0, 4 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        for i in [0, 0, 1] {
            pull(&mut s, &mut k, i, t0);
        }
        // Socket 0's first chunk arrived, its second did not.
        k[0].acked = H + 4096;
        s.sample(0, 0, k[0].acked, k[0].end, t0 + 10 * MS);
        // Nobody else advanced: no retirement however long (a frozen peer
        // is the heartbeats' business).
        s.sample(0, 0, k[0].acked, k[0].end, t0 + 5000 * MS);
        assert!(s.take_retired().is_empty());
        // Socket 1 advances: socket 0 has been stuck for over a second.
        k[1].acked = k[1].end;
        s.sample(1, 0, k[1].acked, k[1].end, t0 + 5001 * MS);
        assert_eq!(
            s.take_retired(),
            vec![Retired {
                index: 0,
                gen: 0,
                why: Why::Stalled,
                requeued: 1
            }]
        );
        assert!(!s.is_live(0, 0));
        assert_eq!(
            pull(&mut s, &mut k, 0, t0),
            None,
            "a retired socket gets nothing"
        );
        assert_eq!(
            pull(&mut s, &mut k, 1, t0),
            Some((0, 2, true)),
            "re-sent first"
        );
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 3, false)));
        assert_eq!(pull(&mut s, &mut k, 1, t0), None);
    }

    #[test]
    fn a_stalled_socket_is_retired_though_the_others_finished_long_ago() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 1], Some(1000 * MS), t0);
        s.start(0, 0, 2 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        pull(&mut s, &mut k, 0, t0);
        pull(&mut s, &mut k, 1, t0);
        // Socket 1 delivered its chunk at once and has nothing left; the
        // message waits on socket 0, which is looked at only later.
        k[1].acked = k[1].end;
        s.sample(1, 0, k[1].acked, k[1].end, t0 + MS);
        s.sample(0, 0, k[0].acked, k[0].end, t0 + 900 * MS);
        assert!(s.take_retired().is_empty(), "not yet the stall timeout");
        s.sample(0, 0, k[0].acked, k[0].end, t0 + 5000 * MS);
        let r = s.take_retired();
        assert_eq!((r.len(), r[0].index, r[0].requeued), (1, 0, 1));
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 0, true)));
    }

    #[test]
    fn no_stall_timeout_never_retires_and_failures_do() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 1], None, t0);
        s.start(0, 0, 2 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        pull(&mut s, &mut k, 0, t0);
        pull(&mut s, &mut k, 1, t0);
        k[1].acked = k[1].end;
        s.sample(1, 0, k[1].acked, k[1].end, t0 + 3_600_000 * MS);
        assert!(s.take_retired().is_empty());
        let e = Error::ConnectionLost("reset".into());
        assert!(
            !s.retire(0, 1, Why::Failed(e.clone())),
            "another generation: stale"
        );
        assert!(s.retire(0, 0, Why::Failed(e.clone())));
        assert!(!s.retire(0, 0, Why::Failed(e)), "once");
        assert_eq!(s.take_retired()[0].requeued, 1);
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((0, 0, true)));
    }

    #[test]
    fn the_receivers_report_queues_what_is_neither_in_place_nor_on_the_way() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 1, 2], None, t0);
        s.start(7, 0, 20 * 4096, 4096, true);
        let mut k = [Sock::default(); 3];
        // Socket 0's chunks 0, 3, .. 15 (all acknowledged by TCP); 1 on
        // socket 1 and 2 on socket 2 are on the way.
        for _ in 0..6 {
            pull(&mut s, &mut k, 0, t0);
            k[0].acked = k[0].end;
        }
        pull(&mut s, &mut k, 1, t0);
        pull(&mut s, &mut k, 2, t0);
        s.sample(0, 0, k[0].acked, k[0].end, t0);
        s.retire(0, 0, Why::Stalled);
        assert_eq!(s.take_retired()[0].requeued, 0, "TCP had them all");
        // The receiver lost 6 and 12 with the socket: in place are 0, 3,
        // 9 and 15; the others never went.
        let bits = [0b0000_1001, 0b1000_0010, 0];
        assert_eq!(s.placed(7, 0, &bits), 2);
        assert_eq!(s.placed(7, 0, &bits), 0, "queued once");
        assert_eq!(s.placed(99, 0, &[0]), 0, "an acknowledged message");
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((7, 6, true)));
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((7, 12, true)));
        assert_eq!(pull(&mut s, &mut k, 1, t0), Some((7, 4, false)));
    }

    #[test]
    fn a_chunk_stuck_behind_a_slow_socket_is_copied_once_by_a_faster_one() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 1, 2], Some(1000 * MS), t0);
        s.start(0, 0, 6 * 4096, 4096, true);
        s.start(1, 1, 4096, 4096, false);
        let mut k = [Sock::default(); 3];
        // Dealt in turn: socket 0 has chunks 0 and 3 of message 0 and
        // message 1's, socket 1 has 1 and 4, socket 2 has 2 and 5.
        for i in [0, 0, 0, 1, 1, 2, 2] {
            pull(&mut s, &mut k, i, t0);
        }
        // Sockets 1 and 2 delivered theirs (but a byte) in 10 ms.
        let t1 = t0 + 10 * MS;
        for (i, sock) in k.iter_mut().enumerate().skip(1) {
            sock.acked = sock.end - 1;
            s.sample(i, 0, sock.acked, sock.end, t1);
        }
        // Socket 0 is slow: chunk 0 has only begun to arrive, 3 not at all.
        k[0].acked = 100;
        s.sample(0, 0, k[0].acked, k[0].end, t1);
        assert_eq!(
            pull(&mut s, &mut k, 1, t1),
            Some((0, 3, true)),
            "the one not begun"
        );
        assert_eq!(
            pull(&mut s, &mut k, 2, t1),
            None,
            "once, the begun one is left to finish, and message 1 is not copied"
        );
        // Half the stall timeout without progress: the begun one too.
        let t2 = t1 + 600 * MS;
        k[1].acked = k[1].end;
        s.sample(1, 0, k[1].acked, k[1].end, t2);
        k[2].acked = k[2].end;
        assert_eq!(pull(&mut s, &mut k, 2, t2), Some((0, 0, true)));
        k[2].acked = k[2].end;
        assert_eq!(pull(&mut s, &mut k, 2, t2), None);
        // Sockets that keep up do not copy each other.
        let mut e = Sched::new(&[0, 1], None, t0);
        e.start(0, 0, 2 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        pull(&mut e, &mut k, 0, t0);
        assert_eq!(pull(&mut e, &mut k, 1, t0), Some((0, 1, false)));
        k[1].acked = k[1].end;
        assert_eq!(pull(&mut e, &mut k, 1, t0), None);
    }

    #[test]
    fn a_revived_socket_starts_a_fresh_stream() {
        let t0 = Instant::now();
        let mut s = Sched::new(&[0, 1], Some(1000 * MS), t0);
        s.start(0, 0, 8 * 4096, 4096, true);
        let mut k = [Sock::default(); 2];
        pull(&mut s, &mut k, 0, t0);
        s.retire(0, 0, Why::Stalled);
        s.revive(0, 1, t0);
        assert_eq!(s.generation(0), Some(1));
        assert_eq!(s.pull(0, 0, 0, 0, t0), None, "the old generation is gone");
        let a = s.pull(0, 1, 0, 0, t0).unwrap();
        assert_eq!((a.k, a.again), (0, true));
        assert_eq!(s.live(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Socket pulls a chunk (if it may).
        Pull(usize),
        /// TCP acknowledges the socket's oldest chunk on the network: it
        /// sits in the receiver's socket buffer.
        Ack(usize),
        /// The receiver reads and places the socket's oldest buffered chunk.
        Place(usize),
        /// The socket reports its acknowledged bytes.
        Sample(usize),
        /// The socket fails (unless it is the last one).
        Fail(usize),
        Tick(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..4).prop_map(Op::Pull),
            4 => (0usize..4).prop_map(Op::Ack),
            4 => (0usize..4).prop_map(Op::Place),
            2 => (0usize..4).prop_map(Op::Sample),
            1 => (0usize..4).prop_map(Op::Fail),
            1 => (1u32..800).prop_map(Op::Tick),
        ]
    }

    /// A model of the network and the receiver around a `Sched`.
    struct World {
        s: Sched<u32>,
        /// Per message and chunk: in place.
        placed: Vec<Vec<bool>>,
        acked: Vec<bool>,
        /// Per socket: (stream end, seq, k, acknowledged by TCP).
        pipes: Vec<VecDeque<(u64, u64, u64, bool)>>,
        end: Vec<u64>,
        tcp_acked: Vec<u64>,
        lost: Vec<bool>,
    }

    impl World {
        fn step(&mut self, op: &Op, now: Instant) {
            match *op {
                Op::Pull(i) if !self.lost[i] => {
                    if let Some(a) = self.s.pull(i, 0, self.tcp_acked[i], self.end[i], now) {
                        self.end[i] += H + 4096;
                        self.pipes[i].push_back((self.end[i], a.seq, a.k, false));
                    }
                }
                Op::Ack(i) if !self.lost[i] => {
                    if let Some(c) = self.pipes[i].iter_mut().find(|c| !c.3) {
                        c.3 = true;
                        self.tcp_acked[i] = c.0;
                    }
                }
                Op::Place(i) if !self.lost[i] && self.pipes[i].front().is_some_and(|c| c.3) => {
                    let Some((_, seq, k, _)) = self.pipes[i].pop_front() else {
                        return;
                    };
                    let m = seq as usize;
                    self.placed[m][k as usize] = true;
                    if !self.acked[m] && self.placed[m].iter().all(|&p| p) {
                        self.acked[m] = true;
                        self.s.acked(seq);
                    }
                }
                Op::Sample(i) if !self.lost[i] => {
                    self.s.sample(i, 0, self.tcp_acked[i], self.end[i], now)
                }
                Op::Fail(i) if !self.lost[i] && self.lost.iter().filter(|&&l| !l).count() > 1 => {
                    self.s.retire(i, 0, Why::Failed(Error::Closed));
                }
                _ => {}
            }
            // The comm acts on retirements: the receiver closes the socket
            // (whatever it had not placed is gone) and reports what is in place.
            for r in self.s.take_retired() {
                self.lost[r.index] = true;
                self.pipes[r.index].clear();
                for (seq, p) in self.placed.iter().enumerate() {
                    if self.acked[seq] {
                        continue;
                    }
                    let mut bits = vec![0u8; p.len().div_ceil(8)];
                    for (k, &v) in p.iter().enumerate() {
                        if v {
                            bits[k / 8] |= 1 << (k % 8);
                        }
                    }
                    self.s.placed(seq as u64, 0, &bits);
                }
            }
        }
    }

    proptest! {
        /// Messages over four sockets that fail, stall and copy in any
        /// order, against a receiver that places what arrives and answers
        /// each retirement (losing what the socket held unread): every
        /// message completes.
        #[test]
        fn every_chunk_arrives_whatever_fails(ops in proptest::collection::vec(op(), 1..300)) {
            let t0 = Instant::now();
            let mut now = t0;
            let n = 4;
            let sizes = [5usize, 1, 9, 3];
            let mut w = World {
                s: Sched::new(&[0, 1, 0, 1], Some(500 * MS), t0),
                placed: sizes.iter().map(|&c| vec![false; c]).collect(),
                acked: vec![false; sizes.len()],
                pipes: vec![VecDeque::new(); n],
                end: vec![0; n],
                tcp_acked: vec![0; n],
                lost: vec![false; n],
            };
            for (seq, &c) in sizes.iter().enumerate() {
                w.s.start(seq as u64, seq as u32, c as u64 * 4096, 4096, seq != 3);
            }
            for op in &ops {
                if let Op::Tick(ms) = op {
                    now += *ms * MS;
                }
                w.step(op, now);
            }
            // Then the network works: every live socket pulls and delivers.
            for _ in 0..1000 {
                if w.acked.iter().all(|&a| a) {
                    break;
                }
                for i in 0..n {
                    for op in [Op::Pull(i), Op::Ack(i), Op::Place(i), Op::Sample(i)] {
                        w.step(&op, now);
                    }
                }
            }
            prop_assert!(w.acked.iter().all(|&a| a), "stuck: {:?}", w.placed);
            prop_assert_eq!(w.s.active(), 0);
        }
    }
}
