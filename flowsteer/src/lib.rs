//! Steer a TCP 4-tuple to a NIC RX queue: through gpumemd (TCPX kernels) or
//! the ethtool ntuple ioctl (upstream kernels).
//!
//! [`Steering`] is the seam: a backend installs a rule and hands back a
//! [`RuleHandle`] that removes it when dropped. Backends here:
//! [`ethtool::EthtoolSteering`] (`SIOCETHTOOL` ntuple rules) and
//! [`RecordingSteering`] (a fake for tests). The gpumemd backend plugs in by
//! implementing [`Steering`].

mod error;
pub mod ethtool;
mod recording;
mod rule;

pub use error::SteerError;
pub use recording::{RecordingSteering, SteerEvent};
pub use rule::{FlowTuple, Rule, RuleHandle, RuleId, RuleSet, Steering};
