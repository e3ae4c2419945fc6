//! Matching messages to posted receives. Both ends run this same code on
//! the same inputs (messages in sequence order, receives in posting
//! order), so the sender knows each message's fate without asking.
//!
//! A receive of `n` buffers takes messages one at a time: each goes to the
//! first unfilled buffer with its tag. A message larger than that buffer
//! (`Truncated`), or one whose tag no unfilled buffer has (`Mismatch`),
//! fails the receive: it takes no further message, and its unfilled
//! buffers are released. The failing message is consumed by it.

use std::collections::VecDeque;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome<G> {
    /// The receive that took the message.
    pub group: G,
    /// The buffer the message went to (`None` on a tag mismatch).
    pub buf: Option<usize>,
    pub verdict: Verdict,
    /// Unfilled buffers released because the receive failed.
    pub released: Vec<usize>,
    /// The receive takes no more messages (all filled, or failed).
    pub closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Truncated { buffer: u64 },
    Mismatch,
}

struct Group<G> {
    id: G,
    /// `(len, tag, filled)`.
    bufs: Vec<(u64, i32, bool)>,
    unfilled: usize,
}

/// Posted receives in order, the oldest taking the next message.
pub(crate) struct Matcher<G> {
    groups: VecDeque<Group<G>>,
}

impl<G: Clone> Matcher<G> {
    pub fn new() -> Self {
        Matcher {
            groups: VecDeque::new(),
        }
    }

    /// A receive of `(len, tag)` buffers (at least one).
    pub fn push(&mut self, id: G, bufs: &[(u64, i32)]) {
        self.groups.push_back(Group {
            id,
            bufs: bufs.iter().map(|&(l, t)| (l, t, false)).collect(),
            unfilled: bufs.len(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Gives up the oldest receive (no message will come for it): its id
    /// and unfilled buffers.
    pub fn abandon(&mut self) -> Option<(G, Vec<usize>)> {
        let g = self.groups.pop_front()?;
        let unfilled = g
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.2)
            .map(|(i, _)| i)
            .collect();
        Some((g.id, unfilled))
    }

    /// The fate of the next message; `None` while no receive is posted.
    pub fn assign(&mut self, size: u64, tag: i32) -> Option<Outcome<G>> {
        let g = self.groups.front_mut()?;
        let slot = g.bufs.iter().position(|&(_, t, f)| !f && t == tag);
        let (buf, verdict) = match slot {
            Some(i) if size <= g.bufs[i].0 => (Some(i), Verdict::Accept),
            Some(i) => (
                Some(i),
                Verdict::Truncated {
                    buffer: g.bufs[i].0,
                },
            ),
            None => (None, Verdict::Mismatch),
        };
        if let Some(i) = buf {
            g.bufs[i].2 = true;
            g.unfilled -= 1;
        }
        let failed = verdict != Verdict::Accept;
        let released = if failed {
            g.bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| !b.2)
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        let closed = failed || g.unfilled == 0;
        let id = g.id.clone();
        if closed {
            self.groups.pop_front();
        }
        Some(Outcome {
            group: id,
            buf,
            verdict,
            released,
            closed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(
        group: u32,
        buf: Option<usize>,
        verdict: Verdict,
        released: &[usize],
        closed: bool,
    ) -> Outcome<u32> {
        Outcome {
            group,
            buf,
            verdict,
            released: released.to_vec(),
            closed,
        }
    }

    #[test]
    fn the_table_of_fates() {
        // (receives posted, messages as (size, tag), expected outcomes)
        type Case = (
            Vec<Vec<(u64, i32)>>,
            Vec<(u64, i32)>,
            Vec<Option<Outcome<u32>>>,
        );
        let cases: Vec<Case> = vec![
            // Nothing posted: no fate yet.
            (vec![], vec![(1, 1)], vec![None]),
            // Tags pick buffers in any order; the group closes when full.
            (
                vec![vec![(10, 1), (10, 2)]],
                vec![(5, 2), (10, 1)],
                vec![
                    Some(o(0, Some(1), Verdict::Accept, &[], false)),
                    Some(o(0, Some(0), Verdict::Accept, &[], true)),
                ],
            ),
            // Truncation fails the group: the other buffer is released,
            // and the next message goes to the next receive.
            (
                vec![vec![(64, 1), (10, 2)], vec![(100, 3)]],
                vec![(100, 2), (70, 3)],
                vec![
                    Some(o(0, Some(1), Verdict::Truncated { buffer: 10 }, &[0], true)),
                    Some(o(1, Some(0), Verdict::Accept, &[], true)),
                ],
            ),
            // A tag no buffer has: the group fails and consumes it; it
            // never takes the message after (finding: silent loss).
            (
                vec![vec![(10, 1), (10, 2)], vec![(10, 2)]],
                vec![(1, 1), (1, 9), (1, 2)],
                vec![
                    Some(o(0, Some(0), Verdict::Accept, &[], false)),
                    Some(o(0, None, Verdict::Mismatch, &[1], true)),
                    Some(o(1, Some(0), Verdict::Accept, &[], true)),
                ],
            ),
            // Two messages with one tag in a group with that tag once.
            (
                vec![vec![(10, 5), (10, 6)]],
                vec![(1, 5), (1, 5)],
                vec![
                    Some(o(0, Some(0), Verdict::Accept, &[], false)),
                    Some(o(0, None, Verdict::Mismatch, &[1], true)),
                ],
            ),
            // Exact fit and empty messages are accepted.
            (
                vec![vec![(0, 0)], vec![(7, 0)]],
                vec![(0, 0), (7, 0)],
                vec![
                    Some(o(0, Some(0), Verdict::Accept, &[], true)),
                    Some(o(1, Some(0), Verdict::Accept, &[], true)),
                ],
            ),
        ];
        for (i, (posts, msgs, want)) in cases.into_iter().enumerate() {
            let mut m = Matcher::new();
            for (g, bufs) in posts.iter().enumerate() {
                m.push(g as u32, bufs);
            }
            let got: Vec<_> = msgs.iter().map(|&(s, t)| m.assign(s, t)).collect();
            assert_eq!(got, want, "case {i}");
        }
    }

    proptest! {
        /// Every buffer of every receive is filled or released exactly once,
        /// and a receive never takes a message after it failed or filled up.
        #[test]
        fn buffers_are_accounted_once(
            posts in proptest::collection::vec(proptest::collection::vec((0u64..20, 0i32..3), 1..=8), 0..20),
            msgs in proptest::collection::vec((0u64..25, 0i32..4), 0..60),
        ) {
            let mut m = Matcher::new();
            for (g, bufs) in posts.iter().enumerate() {
                m.push(g, bufs);
            }
            let mut seen: Vec<Vec<u32>> = posts.iter().map(|b| vec![0; b.len()]).collect();
            let mut closed = vec![false; posts.len()];
            let mut last_group = 0usize;
            for &(s, t) in &msgs {
                let Some(out) = m.assign(s, t) else { break };
                prop_assert!(!closed[out.group]);
                prop_assert!(out.group >= last_group, "receives are served in posting order");
                last_group = out.group;
                if let Some(b) = out.buf {
                    seen[out.group][b] += 1;
                    prop_assert_eq!(posts[out.group][b].1, t);
                }
                for &b in &out.released {
                    seen[out.group][b] += 1;
                }
                closed[out.group] = out.closed;
            }
            for (g, s) in seen.iter().enumerate() {
                if closed[g] {
                    prop_assert!(s.iter().all(|&c| c == 1), "group {g}: {s:?}");
                } else {
                    prop_assert!(s.iter().all(|&c| c <= 1), "group {g}: {s:?}");
                }
            }
        }
    }
}
