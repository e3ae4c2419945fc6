//! Steer a TCP 4-tuple to a NIC RX queue: through gpumemd (TCPX kernels) or
//! the ethtool ntuple ioctl (upstream kernels).
//!
//! [`Steering`] is the seam: a backend installs a rule and hands back a
//! [`RuleHandle`] that removes it when dropped. Backends here:
//! [`ethtool::EthtoolSteering`] (`SIOCETHTOOL` ntuple rules) and
//! [`gpumemd::GpumemdSteering`] (the daemon's rule requests, for TCPX kernels)
//! and [`RecordingSteering`] (a fake for tests).

mod error;
pub mod ethtool;
pub mod gpumemd;
mod recording;
mod rule;

pub use error::SteerError;
pub use recording::{RecordingSteering, SteerEvent};
pub use rule::{FlowTuple, Rule, RuleHandle, RuleId, RuleSet, Steering};
