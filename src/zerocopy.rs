//! MSG_ZEROCOPY bookkeeping, sans I/O (Documentation/networking/msg_zerocopy.rst).
//!
//! Every successful `sendmsg(MSG_ZEROCOPY)` on a socket takes the next 32-bit
//! id; the kernel later reports finished ids as inclusive ranges `[lo, hi]`
//! (`sock_extended_err.ee_info` / `ee_data`, origin `SO_EE_ORIGIN_ZEROCOPY`),
//! possibly merged, possibly out of order, wrapping at 2^32. A buffer may be
//! reused only once every id that covered it is reported.

/// `SO_ZEROCOPY` (include/uapi/asm-generic/socket.h).
pub(crate) const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` (include/uapi/linux/errqueue.h).
pub(crate) const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied the data after all.
pub(crate) const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// One completion notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    pub lo: u32,
    pub hi: u32,
    pub copied: bool,
}

/// A zero-copy completion from an error-queue record, or `None` for any
/// other kind of record (a real socket error, an ICMP report, ...).
pub(crate) fn completion(ee: &libc::sock_extended_err) -> Option<Completion> {
    (ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0).then_some(Completion {
        lo: ee.ee_info,
        hi: ee.ee_data,
        copied: ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
    })
}

/// Which ids have completed: everything before `floor`, plus ranges above it.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// Next id the kernel will assign.
    next: u32,
    /// Every id in `[base, floor)` has completed (distances from `base` avoid wrap trouble).
    floor: u32,
    /// Completed ranges at or above `floor`, as half-open offsets from `floor`'s base.
    pending: Vec<(u32, u32)>,
    pub copied: u64,
    pub zerocopied: u64,
}

impl Tracker {
    /// Records a successful MSG_ZEROCOPY send; returns its id.
    pub fn sent(&mut self) -> u32 {
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        id
    }

    /// The full id of an outstanding send from its low `bits` bits (io_uring
    /// carries only those in `user_data`); exact while fewer than 2^bits are outstanding.
    pub fn expand(&self, low: u32, bits: u32) -> u32 {
        let mask = (1u32 << bits) - 1;
        self.floor.wrapping_add(low.wrapping_sub(self.floor) & mask)
    }

    /// Ids handed out and not yet completed.
    pub fn outstanding(&self) -> u32 {
        self.next.wrapping_sub(self.floor)
    }

    /// True once `id` and every id before it have completed.
    pub fn done_through(&self, id: u32) -> bool {
        // id is below floor iff its distance back from next exceeds the outstanding count.
        self.next.wrapping_sub(id) > self.outstanding()
    }

    /// Applies a notification. Ranges outside the outstanding window are ignored.
    pub fn complete(&mut self, c: Completion) {
        let count = c.hi.wrapping_sub(c.lo).wrapping_add(1);
        if c.copied {
            self.copied += count as u64;
        } else {
            self.zerocopied += count as u64;
        }
        let window = self.outstanding();
        let start = c.lo.wrapping_sub(self.floor);
        if start >= window || count == 0 || count > window - start {
            return;
        }
        self.pending.push((start, start + count));
        self.pending.sort_unstable();
        // Advance the floor over every range that now touches it.
        let mut advanced = 0u32;
        self.pending.retain(|&(s, e)| {
            if s <= advanced {
                advanced = advanced.max(e);
                false
            } else {
                true
            }
        });
        if advanced > 0 {
            self.floor = self.floor.wrapping_add(advanced);
            for r in &mut self.pending {
                r.0 -= advanced;
                r.1 -= advanced;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(lo: u32, hi: u32) -> Completion {
        Completion {
            lo,
            hi,
            copied: false,
        }
    }

    #[test]
    fn in_order_and_merged_ranges() {
        let mut t = Tracker::default();
        let ids: Vec<u32> = (0..5).map(|_| t.sent()).collect();
        assert!(!t.done_through(ids[0]));
        t.complete(c(0, 1));
        assert!(t.done_through(1) && !t.done_through(2));
        t.complete(c(2, 4));
        assert!(t.done_through(4));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn out_of_order_ranges_wait_for_the_gap() {
        let mut t = Tracker::default();
        for _ in 0..6 {
            t.sent();
        }
        t.complete(c(3, 5));
        assert!(!t.done_through(0) && !t.done_through(5));
        t.complete(c(1, 2));
        assert!(!t.done_through(1));
        t.complete(c(0, 0));
        assert!(t.done_through(5));
    }

    #[test]
    fn wraps_around_the_32_bit_counter() {
        let mut t = Tracker {
            next: u32::MAX - 1,
            floor: u32::MAX - 1,
            ..Tracker::default()
        };
        let ids: Vec<u32> = (0..4).map(|_| t.sent()).collect();
        assert_eq!(ids, vec![u32::MAX - 1, u32::MAX, 0, 1]);
        t.complete(c(0, 1));
        assert!(!t.done_through(u32::MAX));
        t.complete(c(u32::MAX - 1, u32::MAX));
        assert!(t.done_through(1));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn copied_flag_is_counted_and_stale_ranges_ignored() {
        let mut t = Tracker::default();
        t.sent();
        t.sent();
        t.complete(Completion {
            lo: 0,
            hi: 1,
            copied: true,
        });
        assert_eq!((t.copied, t.zerocopied), (2, 0));
        t.complete(c(0, 1)); // duplicate: already below the floor
        t.complete(c(7, 9)); // never sent
        assert_eq!(t.outstanding(), 0);
        t.sent();
        assert!(!t.done_through(2));
    }

    #[test]
    fn low_bits_expand_to_the_outstanding_id() {
        let mut t = Tracker {
            next: (1 << 24) - 2,
            floor: (1 << 24) - 2,
            ..Tracker::default()
        };
        let ids: Vec<u32> = (0..4).map(|_| t.sent()).collect();
        for id in ids {
            assert_eq!(t.expand(id & 0xFF_FFFF, 24), id);
        }
    }

    #[test]
    fn records_of_other_origins_are_not_completions() {
        // SAFETY: sock_extended_err is plain old data; all-zero is valid.
        let mut ee: libc::sock_extended_err = unsafe { std::mem::zeroed() };
        ee.ee_origin = 2; // SO_EE_ORIGIN_ICMP
        assert_eq!(completion(&ee), None);
        ee.ee_origin = SO_EE_ORIGIN_ZEROCOPY;
        ee.ee_info = 4;
        ee.ee_data = 9;
        ee.ee_code = SO_EE_CODE_ZEROCOPY_COPIED;
        assert_eq!(
            completion(&ee),
            Some(Completion {
                lo: 4,
                hi: 9,
                copied: true
            })
        );
    }

    #[test]
    fn constants_match_the_kernel_headers() {
        assert_eq!(SO_ZEROCOPY, 60);
        assert_eq!(libc::MSG_ZEROCOPY, 0x4000000);
        assert_eq!(SO_EE_ORIGIN_ZEROCOPY, 5);
    }
}
