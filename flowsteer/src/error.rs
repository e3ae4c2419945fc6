#![forbid(unsafe_code)]

/// Errors of flow steering.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SteerError {
    /// gpumemd refused or did not answer a rule request.
    #[error("gpumemd could not {op}: {reason}")]
    Daemon {
        /// What was attempted.
        op: &'static str,
        /// The daemon client's error.
        reason: String,
    },
    /// No interface of that name in this network namespace.
    #[error("no network interface named {ifname:?}; check the data NIC list (ip link)")]
    NoSuchInterface {
        /// Interface name.
        ifname: String,
    },
    /// The interface name cannot be passed to the kernel.
    #[error("invalid interface name {ifname:?}: 1 to 15 bytes, no NUL")]
    InvalidInterfaceName {
        /// Interface name.
        ifname: String,
    },
    /// The driver has no ntuple filters, or they are off.
    #[error("NIC {ifname} does not support ntuple filters (ethtool -K {ifname} ntuple on)")]
    NotSupported {
        /// Interface name.
        ifname: String,
    },
    /// Installing rules needs CAP_NET_ADMIN.
    #[error(
        "changing flow rules on {ifname} needs CAP_NET_ADMIN (run as root or grant the capability)"
    )]
    PermissionDenied {
        /// Interface name.
        ifname: String,
    },
    /// The tuple cannot be a rule.
    #[error("cannot steer {tuple}: {reason}")]
    InvalidTuple {
        /// The tuple, printed.
        tuple: String,
        /// Why.
        reason: &'static str,
    },
    /// Any other failure of the kernel call.
    #[error("{op} on {ifname} failed: {source} (EINVAL: queue out of range or rule table full; check ethtool -n {ifname})")]
    Io {
        /// Interface name.
        ifname: String,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
