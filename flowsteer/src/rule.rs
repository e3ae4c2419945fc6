//! The rule model: which flow goes to which queue, owned rules, the backend trait.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::SteerError;

/// A TCP flow as its packets arrive at this host: `src` is the remote peer,
/// `dst` the local socket. Both addresses are of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    /// Source of incoming packets (the peer).
    pub src: SocketAddr,
    /// Destination of incoming packets (us).
    pub dst: SocketAddr,
}

impl FlowTuple {
    /// The incoming direction of a connected socket.
    pub fn incoming(local: SocketAddr, peer: SocketAddr) -> Self {
        FlowTuple {
            src: peer,
            dst: local,
        }
    }

    /// Whether this is an IPv6 flow; an error if the families differ.
    pub fn is_ipv6(&self) -> Result<bool, SteerError> {
        match (self.src, self.dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => Ok(false),
            (SocketAddr::V6(_), SocketAddr::V6(_)) => Ok(true),
            _ => Err(SteerError::InvalidTuple {
                tuple: self.to_string(),
                reason: "source and destination are of different address families",
            }),
        }
    }
}

impl fmt::Display for FlowTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp {} -> {}", self.src, self.dst)
    }
}

/// A backend's name for an installed rule (ethtool: the rule location).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u64);

/// An installed steering rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The flow it matches.
    pub tuple: FlowTuple,
    /// The RX queue it delivers to.
    pub queue: u32,
    /// The backend's id for it.
    pub id: RuleId,
}

/// A way to steer flows to RX queues.
///
/// Implementations are cheap to clone into an `Arc` (the handle keeps one to
/// remove its rule) and safe to share between threads.
pub trait Steering: Send + Sync {
    /// Installs a rule sending `tuple` to RX queue `queue`.
    fn install(&self, tuple: FlowTuple, queue: u32) -> Result<RuleHandle, SteerError>;
    /// Removes a rule this backend installed.
    fn remove(&self, rule: &Rule) -> Result<(), SteerError>;
}

/// An installed rule, removed when dropped.
#[must_use = "dropping the handle removes the rule"]
pub struct RuleHandle {
    rule: Rule,
    owner: Option<Arc<dyn Steering>>,
}

impl RuleHandle {
    /// For backends: ties `rule` to the backend that removes it.
    pub fn new(rule: Rule, owner: Arc<dyn Steering>) -> Self {
        RuleHandle {
            rule,
            owner: Some(owner),
        }
    }

    /// The installed rule.
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// Removes the rule now, reporting failure (drop only logs it).
    pub fn remove(mut self) -> Result<(), SteerError> {
        match self.owner.take() {
            Some(owner) => owner.remove(&self.rule),
            None => Ok(()),
        }
    }

    /// Removes the rule now; on failure the handle still owns it, so the
    /// removal can be tried again (or the rule kept with `detach`).
    pub fn try_remove(&mut self) -> Result<(), SteerError> {
        match &self.owner {
            Some(owner) => owner.remove(&self.rule)?,
            None => return Ok(()),
        }
        self.owner = None;
        Ok(())
    }

    /// Keeps the rule installed past the handle; returns it.
    pub fn detach(mut self) -> Rule {
        self.owner = None;
        self.rule.clone()
    }
}

impl fmt::Debug for RuleHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleHandle")
            .field("rule", &self.rule)
            .field("owned", &self.owner.is_some())
            .finish()
    }
}

impl Drop for RuleHandle {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            if let Err(e) = owner.remove(&self.rule) {
                tracing::warn!(rule = ?self.rule, error = %e, "could not remove flow steering rule");
            }
        }
    }
}

/// The rules of one connection (one per data socket), removed together.
#[derive(Debug, Default)]
pub struct RuleSet {
    handles: Vec<RuleHandle>,
}

impl RuleSet {
    /// An empty set.
    pub fn new() -> Self {
        RuleSet::default()
    }

    /// Installs one more rule; on failure the set is unchanged.
    pub fn install(
        &mut self,
        steering: &dyn Steering,
        tuple: FlowTuple,
        queue: u32,
    ) -> Result<&Rule, SteerError> {
        let h = steering.install(tuple, queue)?;
        self.handles.push(h);
        Ok(self.handles[self.handles.len() - 1].rule())
    }

    /// Installs a rule per tuple, all or none: on failure the ones already
    /// installed by this call are removed again.
    pub fn install_all(
        &mut self,
        steering: &dyn Steering,
        tuples: &[FlowTuple],
        queue: u32,
    ) -> Result<(), SteerError> {
        let mut new = Vec::with_capacity(tuples.len());
        for t in tuples {
            new.push(steering.install(*t, queue)?);
        }
        self.handles.extend(new);
        Ok(())
    }

    /// The installed rules.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.handles.iter().map(RuleHandle::rule)
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Removes every rule, returning the first error (all are attempted).
    pub fn remove_all(&mut self) -> Result<(), SteerError> {
        let mut first = Ok(());
        for h in self.handles.drain(..) {
            if let Err(e) = h.remove() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}
