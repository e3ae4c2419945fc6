//! Heartbeats: each end sends a Ping when it has written nothing for a
//! while, and gives up on a peer it has heard nothing from for the peer
//! timeout. A live peer is heard however slowly it consumes data; only a
//! frozen process, a dead host or a cut network goes quiet.

use std::time::{Duration, Instant};

use crate::error::Error;

/// Heartbeats per peer timeout: a peer misses three in a row before it is
/// given up on, so one late wake-up of the sending thread is no alarm.
pub(crate) const HEARTBEATS_PER_TIMEOUT: u32 = 4;

pub(crate) struct Liveness {
    /// Our own patience; `None` never gives up.
    timeout: Option<Duration>,
    /// How often we must speak: for the stricter of the two ends.
    interval: Option<Duration>,
    last_rx: Instant,
    last_tx: Instant,
    pings: u64,
}

impl Liveness {
    /// `own`: our peer timeout; `peer`: the peer's (from the handshake).
    pub fn new(own: Option<Duration>, peer: Option<Duration>, now: Instant) -> Self {
        let strictest = match (own, peer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Liveness {
            timeout: own,
            interval: strictest.map(|t| t / HEARTBEATS_PER_TIMEOUT),
            last_rx: now,
            last_tx: now,
            pings: 0,
        }
    }

    /// Bytes arrived from the peer.
    pub fn heard(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// Bytes left for the peer.
    pub fn spoke(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// `PeerUnresponsive` once the peer was silent for the timeout.
    pub fn check(&self, now: Instant) -> Result<(), Error> {
        match self.timeout {
            Some(t) if now.saturating_duration_since(self.last_rx) > t => {
                Err(Error::PeerUnresponsive {
                    after_ms: t.as_millis() as u64,
                })
            }
            _ => Ok(()),
        }
    }

    /// When the next heartbeat or check falls due (`None`: never).
    pub fn due(&self) -> Option<Instant> {
        let ping = self.interval.map(|i| self.last_tx + i);
        let check = self.timeout.map(|t| self.last_rx + t);
        match (ping, check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The number of the Ping to send now, if one is due.
    pub fn ping_due(&mut self, now: Instant) -> Option<u64> {
        let i = self.interval?;
        if now.saturating_duration_since(self.last_tx) < i {
            return None;
        }
        self.pings += 1;
        Some(self.pings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_is_given_up_after_the_timeout_and_not_before() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Liveness::new(Some(2 * s), None, t0);
        assert!(l.check(t0 + 2 * s).is_ok());
        l.heard(t0 + s);
        assert!(l.check(t0 + 3 * s).is_ok());
        assert_eq!(
            l.check(t0 + 3 * s + Duration::from_millis(1)),
            Err(Error::PeerUnresponsive { after_ms: 2000 })
        );
        assert!(Liveness::new(None, None, t0).check(t0 + 1000 * s).is_ok());
    }

    #[test]
    fn pings_follow_the_stricter_timeout_and_only_when_quiet() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut l = Liveness::new(Some(10_000 * ms), Some(2000 * ms), t0);
        assert_eq!(l.ping_due(t0 + 499 * ms), None);
        assert_eq!(l.ping_due(t0 + 500 * ms), Some(1));
        l.spoke(t0 + 500 * ms);
        assert_eq!(l.ping_due(t0 + 900 * ms), None);
        assert_eq!(l.ping_due(t0 + 1000 * ms), Some(2));
        let mut quiet = Liveness::new(None, None, t0);
        assert_eq!(quiet.ping_due(t0 + 3_600_000 * ms), None);
        let mut theirs = Liveness::new(None, Some(400 * ms), t0);
        assert_eq!(theirs.ping_due(t0 + 100 * ms), Some(1));
    }

    #[test]
    fn the_next_due_time_is_the_sooner_of_heartbeat_and_check() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let mut l = Liveness::new(Some(2000 * ms), None, t0);
        assert_eq!(l.due(), Some(t0 + 500 * ms));
        l.spoke(t0 + 1900 * ms);
        assert_eq!(l.due(), Some(t0 + 2000 * ms), "the check comes first now");
        assert_eq!(Liveness::new(None, None, t0).due(), None);
    }
}
