//! The TCPX backend: gpumemd installs and removes the rules
//! (`rx_rule_manager` / `rx_rule_uninstall`), steering each flow to one of
//! the GPU's RX queues.
#![forbid(unsafe_code)]

use std::sync::Arc;

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
}

fn daemon(op: &'static str, e: devmem::gpumemd::GpumemdError) -> SteerError {
    SteerError::Daemon {
        op,
        reason: e.to_string(),
    }
}

impl Steering for GpumemdSteering {
    fn install(&self, tuple: FlowTuple, queue: u32) -> Result<RuleHandle, SteerError> {
        tuple.is_ipv6()?;
        self.client
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
    use std::time::Duration;

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
