//! The TCPX backend: gpumemd installs and removes the rules
//! (`rx_rule_manager` / `rx_rule_uninstall`), steering each flow to one of
//! the GPU's RX queues.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use devmem::gpumemd::{FlowRule, GpumemdClient};

use crate::rule::{FlowTuple, Rule, RuleHandle, RuleId, Steering};
use crate::SteerError;

/// Steers through gpumemd for one GPU. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GpumemdSteering {
    client: GpumemdClient,
    gpu_pci: String,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl GpumemdSteering {
    pub fn new(client: GpumemdClient, gpu_pci: impl Into<String>) -> Self {
        GpumemdSteering {
            client,
            gpu_pci: gpu_pci.into(),
            next_id: Arc::default(),
        }
    }

    fn request(&self, tuple: &FlowTuple, queue: u32) -> FlowRule {
        FlowRule {
            src: tuple.src,
            dst: tuple.dst,
            gpu_pci_addr: Some(self.gpu_pci.clone()),
            queue_id: Some(queue as i32),
        }
    }

    /// `install`, with the exchange bounded by `budget` when that is shorter
    /// than the client's deadline (callers installing many rules against one
    /// total deadline). The rule's removal keeps the full deadline.
    pub fn install_within(
        &self,
        tuple: FlowTuple,
        queue: u32,
        budget: Duration,
    ) -> Result<RuleHandle, SteerError> {
        tuple.is_ipv6()?;
        let client = if budget < self.client.deadline() {
            GpumemdClient::new(self.client.prefix(), budget)
        } else {
            self.client.clone()
        };
        client
            .install_rule(&self.request(&tuple, queue))
            .map_err(|e| daemon("install a flow-steering rule", e))?;
        let id = RuleId(
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        Ok(RuleHandle::new(
            Rule { tuple, queue, id },
            Arc::new(self.clone()),
        ))
    }
}

fn daemon(op: &'static str, e: devmem::gpumemd::GpumemdError) -> SteerError {
    SteerError::Daemon {
        op,
        reason: e.to_string(),
    }
}

impl Steering for GpumemdSteering {
    fn install(&self, tuple: FlowTuple, queue: u32) -> Result<RuleHandle, SteerError> {
        self.install_within(tuple, queue, self.client.deadline())
    }

    fn remove(&self, rule: &Rule) -> Result<(), SteerError> {
        self.client
            .uninstall_rule(&self.request(&rule.tuple, rule.queue))
            .map_err(|e| daemon("remove a flow-steering rule", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devmem::gpumemd::mock::{MockConfig, MockGpumemd};

    #[test]
    fn rules_go_to_the_daemon_and_leave_on_drop() {
        let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
        let s = GpumemdSteering::new(
            mock.client(Duration::from_secs(2)),
            MockConfig::default().gpu_pci,
        );
        let t = FlowTuple::incoming(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.2:6000".parse().unwrap(),
        );
        let h = s.install(t, 3).unwrap();
        let rules = mock.installed_rules();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            (rules[0].src, rules[0].queue_id),
            ("127.0.0.2:6000".parse().unwrap(), Some(3))
        );
        drop(h);
        assert!(mock.installed_rules().is_empty());
    }

    #[test]
    fn a_failed_removal_keeps_the_rule_for_a_retry() {
        use devmem::gpumemd::mock::{Endpoint, Fault};
        let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
        let s = GpumemdSteering::new(
            mock.client(Duration::from_millis(200)),
            MockConfig::default().gpu_pci,
        );
        let t = FlowTuple::incoming(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.2:6000".parse().unwrap(),
        );
        let mut h = s.install(t, 3).unwrap();
        mock.set_fault(Fault::Hang, Some(Endpoint::RuleUninstall));
        assert!(matches!(h.try_remove(), Err(SteerError::Daemon { .. })));
        assert_eq!(mock.installed_rules().len(), 1);
        mock.set_fault(Fault::None, None);
        h.try_remove().unwrap();
        assert!(mock.installed_rules().is_empty());
        drop(h); // removed already: no second request
    }

    #[test]
    fn install_within_bounds_the_exchange_by_the_budget() {
        use devmem::gpumemd::mock::{Endpoint, Fault};
        let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
        mock.set_fault(Fault::Hang, Some(Endpoint::RuleInstall));
        let s = GpumemdSteering::new(
            mock.client(Duration::from_secs(5)),
            MockConfig::default().gpu_pci,
        );
        let t = FlowTuple::incoming(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.2:6000".parse().unwrap(),
        );
        let t0 = std::time::Instant::now();
        let r = s.install_within(t, 3, Duration::from_millis(200));
        assert!(matches!(r, Err(SteerError::Daemon { .. })));
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    #[test]
    fn an_absent_daemon_is_a_typed_error() {
        let dir = std::env::temp_dir().join(format!("flowsteer-nodaemon-{}", std::process::id()));
        let s = GpumemdSteering::new(
            GpumemdClient::new(&dir, Duration::from_millis(200)),
            "0000:04:00.0",
        );
        let t = FlowTuple::incoming(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.2:6000".parse().unwrap(),
        );
        assert!(matches!(s.install(t, 0), Err(SteerError::Daemon { .. })));
    }
}
