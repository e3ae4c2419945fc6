//! A fake backend that records what it was asked to do.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use crate::{FlowTuple, Rule, RuleHandle, RuleId, SteerError, Steering};

/// One call seen by [`RecordingSteering`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SteerEvent {
    /// A rule was installed.
    Installed(Rule),
    /// A rule was removed.
    Removed(Rule),
}

#[derive(Debug, Default)]
struct State {
    events: Vec<SteerEvent>,
    active: Vec<Rule>,
    next_id: u64,
    fail_install: Option<(usize, SteerError)>,
}

/// Records installs and removes; clones share the record.
#[derive(Debug, Clone, Default)]
pub struct RecordingSteering {
    state: Arc<Mutex<State>>,
}

impl RecordingSteering {
    /// An empty recorder.
    pub fn new() -> Self {
        RecordingSteering::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the record.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every install and remove, in order.
    pub fn events(&self) -> Vec<SteerEvent> {
        self.lock().events.clone()
    }

    /// Rules installed and not yet removed.
    pub fn active(&self) -> Vec<Rule> {
        self.lock().active.clone()
    }

    /// Makes the next `install` fail with `err` (fault injection).
    pub fn fail_next_install(&self, err: SteerError) {
        self.fail_nth_install(0, err);
    }

    /// Lets `n` installs succeed, then fails the next one with `err`.
    pub fn fail_nth_install(&self, n: usize, err: SteerError) {
        self.lock().fail_install = Some((n, err));
    }
}

impl Steering for RecordingSteering {
    fn install(&self, tuple: FlowTuple, queue: u32) -> Result<RuleHandle, SteerError> {
        tuple.is_ipv6()?;
        let rule = {
            let mut s = self.lock();
            match s.fail_install.take() {
                Some((0, e)) => return Err(e),
                Some((n, e)) => s.fail_install = Some((n - 1, e)),
                None => {}
            }
            let rule = Rule {
                tuple,
                queue,
                id: RuleId(s.next_id),
            };
            s.next_id += 1;
            s.events.push(SteerEvent::Installed(rule.clone()));
            s.active.push(rule.clone());
            rule
        };
        Ok(RuleHandle::new(rule, Arc::new(self.clone())))
    }

    fn remove(&self, rule: &Rule) -> Result<(), SteerError> {
        let mut s = self.lock();
        s.active.retain(|r| r.id != rule.id);
        s.events.push(SteerEvent::Removed(rule.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RuleSet;

    fn t(sport: u16) -> FlowTuple {
        FlowTuple {
            src: format!("10.0.0.1:{sport}").parse().unwrap(),
            dst: "10.0.0.2:5000".parse().unwrap(),
        }
    }

    #[test]
    fn dropping_the_handle_removes_the_rule() {
        let rec = RecordingSteering::new();
        let h = rec.install(t(1), 3).unwrap();
        assert_eq!(rec.active().len(), 1);
        assert_eq!(h.rule().queue, 3);
        let rule = h.rule().clone();
        drop(h);
        assert!(rec.active().is_empty());
        assert_eq!(
            rec.events(),
            vec![
                SteerEvent::Installed(rule.clone()),
                SteerEvent::Removed(rule)
            ]
        );
    }

    #[test]
    fn detach_keeps_the_rule() {
        let rec = RecordingSteering::new();
        let rule = rec.install(t(1), 0).unwrap().detach();
        assert_eq!(rec.active(), vec![rule]);
    }

    #[test]
    fn mixed_families_are_refused() {
        let rec = RecordingSteering::new();
        let bad = FlowTuple {
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "[::1]:2".parse().unwrap(),
        };
        let err = rec.install(bad, 0).unwrap_err();
        assert!(matches!(err, SteerError::InvalidTuple { .. }), "{err}");
        assert!(rec.events().is_empty());
    }

    #[test]
    fn rule_set_is_all_or_nothing_and_removes_on_drop() {
        let rec = RecordingSteering::new();
        let mut set = RuleSet::new();
        set.install_all(&rec, &[t(1), t(2)], 1).unwrap();
        assert_eq!(set.len(), 2);
        // The second of two new installs fails: the first is rolled back.
        rec.fail_nth_install(
            1,
            SteerError::NotSupported {
                ifname: "eth1".into(),
            },
        );
        let err = set.install_all(&rec, &[t(3), t(4)], 1).unwrap_err();
        assert!(matches!(err, SteerError::NotSupported { .. }));
        assert_eq!(set.len(), 2);
        assert_eq!(rec.active().len(), 2);
        let removed = rec
            .events()
            .into_iter()
            .filter(|e| matches!(e, SteerEvent::Removed(r) if r.tuple == t(3)))
            .count();
        assert_eq!(removed, 1);
        drop(set);
        assert!(rec.active().is_empty());
    }

    #[test]
    fn remove_all_reports_and_empties() {
        let rec = RecordingSteering::new();
        let mut set = RuleSet::new();
        set.install(&rec, t(1), 0).unwrap();
        set.install(&rec, t(2), 0).unwrap();
        set.remove_all().unwrap();
        assert!(set.is_empty());
        assert!(rec.active().is_empty());
    }
}
