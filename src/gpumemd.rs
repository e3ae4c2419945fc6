//! The devmem control plane through gpumemd: probe the daemon at init,
//! import its RX pool (the `get_gpu_fd_<pci>` socket, or the legacy
//! `nvdma-<pci>` IPC handle file), optionally register, and steer each
//! accepted data socket's flow to one of the GPU's RX queues for the comm's
//! lifetime.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devmem::cuda::vmm::{self, MappedRange, Mapping};
use devmem::cuda::Context;
use devmem::gpumemd::{legacy, PoolMetadata};
use devmem::pool::{PoolError, RxPool};
use devmem::sockabi::KernelAbi;

use devmem::gpumemd::{GpumemdClient, GpumemdError, Registration, DEFAULT_DEADLINE};
use flowsteer::gpumemd::GpumemdSteering;
use flowsteer::{FlowTuple, RuleHandle};

use crate::config::{Config, DevmemMode, RxmemImport};
use crate::error::{Error, Result};
use crate::path::DevmemSpec;

/// Where an emulated devmem socket's RX pool comes from.
#[derive(Clone)]
pub(crate) enum PoolSource {
    /// Local memory of this many bytes per socket.
    Local(usize),
    /// A part of the pool gpumemd handed out.
    Shared(Arc<SharedPool>),
}

/// gpumemd's RX pool cut into equal parts, one per emulated devmem socket.
pub(crate) struct SharedPool {
    memory: PoolMemory,
    md: PoolMetadata,
    part: u64,
    used: Mutex<Vec<bool>>,
}

/// What gpumemd's pool is.
enum PoolMemory {
    /// A memory file (the mock on machines without a GPU): parts are mapped.
    Host(OwnedFd),
    /// GPU memory imported once into the GPU's context (a CUDA shareable
    /// handle, as tcpgpudmarxd hands out, or a legacy IPC handle); parts
    /// are ranges of that mapping.
    Gpu(Arc<Mapping>),
}

/// The GPU context of `pci`, its CUDA errors typed as the pool's.
fn gpu_context(pci: &str) -> std::result::Result<&'static Context, PoolError> {
    Context::by_pci(pci).map_err(PoolError::Device)
}

impl PoolMemory {
    /// gpumemd's pool by the configured import style. A regular file from
    /// `get_gpu_fd` is host memory (the mock); anything else that passed
    /// `check_pool_fd` is taken for a CUDA handle of GPU `pci`.
    fn import(cfg: &Config, client: &GpumemdClient, pci: &str) -> Result<(Self, PoolMetadata)> {
        let (memory, md) = match cfg.rxmem_import {
            RxmemImport::LegacyFile => {
                let handle = legacy::read_legacy_handle(&cfg.rxmem_legacy_dir, pci)
                    .map_err(Error::devmem)?;
                let ctx = gpu_context(pci).map_err(Error::devmem)?;
                let mapping = Mapping::ipc_open(ctx, &handle)
                    .map_err(|e| Error::devmem(PoolError::Device(e)))?;
                let md = PoolMetadata {
                    daemon_fd: -1,
                    size: mapping.size() as u64,
                    align: vmm::granularity(ctx).map_err(|e| Error::devmem(PoolError::Device(e)))?
                        as u64,
                };
                (PoolMemory::Gpu(Arc::new(mapping)), md)
            }
            RxmemImport::GpuPciClient => {
                let p = client.rx_pool(pci).map_err(Error::devmem)?;
                let st = nix::sys::stat::fstat(p.fd.as_raw_fd()).map_err(|e| {
                    Error::devmem(GpumemdError::BadPoolFd {
                        detail: format!("fstat failed: {e}"),
                    })
                })?;
                if st.st_mode & libc::S_IFMT == libc::S_IFREG {
                    (PoolMemory::Host(p.fd), p.metadata)
                } else {
                    let ctx = gpu_context(pci).map_err(Error::devmem)?;
                    let (size, align) = (p.metadata.size as usize, p.metadata.align as usize);
                    let mapping = vmm::import_pool(ctx, p.fd.as_fd(), size, align)
                        .map_err(|e| Error::devmem(PoolError::Device(e)))?;
                    (PoolMemory::Gpu(Arc::new(mapping)), p.metadata)
                }
            }
        };
        if let PoolMemory::Gpu(m) = &memory {
            // Compiled once per GPU here, so that a missing NVRTC shows at init.
            devmem::cuda::unpack::Unpacker::shared(m.context())
                .map_err(|e| Error::devmem(PoolError::Device(e)))?;
            tracing::info!(gpu = %pci, bytes = md.size, "gpumemd's RX pool is GPU memory: received fragments are unpacked by a CUDA kernel");
        }
        Ok((memory, md))
    }

    /// The whole pool, for kernel devmem sockets (the NIC writes it).
    fn whole(&self, md: &PoolMetadata) -> Result<RxPool> {
        match self {
            PoolMemory::Host(fd) => RxPool::map(fd.as_fd(), md),
            PoolMemory::Gpu(m) => MappedRange::new(m.clone(), 0, m.size())
                .map_err(PoolError::from)
                .and_then(RxPool::device_only),
        }
        .map_err(Error::devmem)
    }
}

/// A part of the shared pool, given back when dropped.
pub(crate) struct PoolPart {
    pool: Arc<SharedPool>,
    index: usize,
}

impl SharedPool {
    /// Maps a free part; the pool is too small when all are taken.
    pub fn take(self: &Arc<Self>) -> Result<(RxPool, PoolPart)> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let Some(index) = used.iter().position(|u| !u) else {
            return Err(Error::Config(format!(
                "the RX pool ({} bytes) has no free {}-byte part left for another data socket; raise the pool or lower TCPX_EMU_POOL_BYTES",
                self.md.size, self.part
            )));
        };
        let offset = index as u64 * self.part;
        let rx = match &self.memory {
            PoolMemory::Host(fd) => RxPool::map_part(fd.as_fd(), &self.md, offset, self.part),
            PoolMemory::Gpu(m) => MappedRange::new(m.clone(), offset as usize, self.part as usize)
                .map_err(devmem::pool::PoolError::from)
                .and_then(RxPool::gpu),
        }
        .map_err(Error::devmem)?;
        used[index] = true;
        Ok((
            rx,
            PoolPart {
                pool: self.clone(),
                index,
            },
        ))
    }
}

impl Drop for PoolPart {
    fn drop(&mut self) {
        let mut used = self.pool.used.lock().unwrap_or_else(|p| p.into_inner());
        used[self.index] = false;
    }
}

/// gpumemd's pool as this process receives into it.
enum Pool {
    /// Cut into parts for emulated devmem sockets.
    Shared(Arc<SharedPool>),
    /// Whole, for kernel devmem sockets, in the kernel's ABI.
    Kernel(KernelAbi, Arc<RxPool>),
}

pub(crate) struct Gpumemd {
    pool: Pool,
    steering: GpumemdSteering,
    queue_ids: Vec<i32>,
    mode: DevmemMode,
    _registration: Option<Registration>,
}

impl Gpumemd {
    /// The daemon when configured, answering, and its pool importable;
    /// `None` means the host path (logged; under `require`, an error).
    pub fn connect(cfg: &Config) -> Result<Option<Self>> {
        let (Some(prefix), Some(pci)) = (&cfg.gpumemd_prefix, &cfg.gpu_pci) else {
            return Ok(None);
        };
        if cfg.devmem == DevmemMode::Off {
            return Ok(None);
        }
        let client = GpumemdClient::new(prefix, DEFAULT_DEADLINE);
        // The queue-id query has no side effects, unlike a registry connection.
        let queue_ids = match client.queue_ids(pci) {
            Ok(q) if !q.is_empty() => q,
            Ok(_) => {
                let path = prefix.clone();
                let detail = format!("no RX queues for GPU {pci}");
                return fallback(
                    cfg,
                    Error::devmem(GpumemdError::InvalidReply {
                        op: "queue ids",
                        path,
                        detail,
                    }),
                );
            }
            Err(e) => return fallback(cfg, Error::devmem(e)),
        };
        let pool = match Self::pool(cfg, &client, pci) {
            Ok(p) => p,
            Err(e) => return fallback(cfg, e),
        };
        let registration = if cfg.gpumemd_register {
            Some(client.register().map_err(Error::devmem)?)
        } else {
            None
        };
        tracing::info!(prefix = %prefix.display(), gpu = %pci, ?queue_ids, "gpumemd answers: devmem control plane on");
        Ok(Some(Gpumemd {
            pool,
            steering: GpumemdSteering::new(client, pci.clone()),
            queue_ids,
            mode: cfg.devmem,
            _registration: registration,
        }))
    }

    /// Imports the pool, and for the kernel's devmem sockets finds the ABI
    /// this kernel speaks.
    fn pool(cfg: &Config, client: &GpumemdClient, pci: &str) -> Result<Pool> {
        let abi = match cfg.devmem_emulated {
            Some(_) => None,
            None => Some(devmem::sockabi::kernel_abi().map_err(Error::devmem)?),
        };
        let (memory, md) = PoolMemory::import(cfg, client, pci)?;
        let Some(abi) = abi else {
            let part = (cfg.emu_pool_bytes as u64).next_multiple_of(md.align.max(4096));
            let parts = (md.size / part) as usize;
            if parts == 0 {
                return Err(Error::Config(format!(
                    "the RX pool ({} bytes) is smaller than one {part}-byte part (TCPX_EMU_POOL_BYTES)",
                    md.size
                )));
            }
            return Ok(Pool::Shared(Arc::new(SharedPool {
                memory,
                md,
                part,
                used: Mutex::new(vec![false; parts]),
            })));
        };
        if abi == KernelAbi::Upstream {
            tracing::warn!("gpumemd is configured but this kernel speaks the upstream devmem ABI (SO_DEVMEM_DONTNEED=97 unknown): data sockets receive with MSG_SOCK_DEVMEM and upstream cmsgs; gpumemd's queues deliver devmem fragments on TCPX kernels, so expect linear bytes here");
        }
        Ok(Pool::Kernel(abi, Arc::new(memory.whole(&md)?)))
    }

    /// The pool's parts for emulated devmem sockets.
    pub fn shared_pool(&self) -> Option<Arc<SharedPool>> {
        match &self.pool {
            Pool::Shared(p) => Some(p.clone()),
            Pool::Kernel(..) => None,
        }
    }

    /// How kernel devmem sockets receive into the daemon's pool.
    pub fn kernel_spec(&self) -> Option<DevmemSpec> {
        match &self.pool {
            Pool::Kernel(abi, memory) => Some(DevmemSpec::Kernel {
                abi: *abi,
                memory: memory.clone(),
                dmabuf_id: None,
            }),
            Pool::Shared(_) => None,
        }
    }

    /// The GPU's RX queues the daemon reported.
    pub fn queue_ids(&self) -> &[i32] {
        &self.queue_ids
    }
    /// Steers the flows of accepted data sockets, one rule each, round-robin
    /// over the queues, all within one client deadline in total: a slow or
    /// hung daemon costs an accept at most that. Under `prefer`, a refused
    /// or unanswered rule leaves the remaining flows unsteered (logged).
    pub fn steer(&self, socks: &[&TcpStream]) -> Result<Vec<RuleHandle>> {
        let deadline = Instant::now() + DEFAULT_DEADLINE;
        let mut out = Vec::with_capacity(socks.len());
        for (i, s) in socks.iter().enumerate() {
            let (local, peer) = match (s.local_addr(), s.peer_addr()) {
                (Ok(l), Ok(p)) => (l, p),
                (Err(e), _) | (_, Err(e)) => {
                    withdraw_all(out);
                    return Err(Error::io("getsockname", e));
                }
            };
            let queue = self.queue_ids[i % self.queue_ids.len()] as u32;
            let left = deadline.saturating_duration_since(Instant::now());
            let installed = if left.is_zero() {
                Err(format!(
                    "no answer for {} of {} rules within {DEFAULT_DEADLINE:?}",
                    socks.len() - i,
                    socks.len()
                ))
            } else {
                self.steering
                    .install_within(FlowTuple::incoming(local, peer), queue, left)
                    .map_err(|e| e.to_string())
            };
            match installed {
                Ok(f) => out.push(f),
                Err(e) if self.mode == DevmemMode::Require => {
                    withdraw_all(out);
                    return Err(Error::Gpumemd(e));
                }
                Err(e) => {
                    tracing::warn!("gpumemd did not install a flow-steering rule ({e}); this comm's remaining flows stay unsteered");
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// How long withdrawals gpumemd did not confirm are retried in the background.
const WITHDRAW_LIFETIME: Duration = Duration::from_secs(30);
/// Exchanges with gpumemd in flight at once per batch of withdrawals.
const WITHDRAW_THREADS: usize = 8;
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(8);

/// Withdraws flow-steering rules (a comm's, at close) in parallel. Returns
/// once gpumemd answered each first attempt, or after one client deadline,
/// whatever the number of rules: rules not confirmed by then stay with
/// background threads that retry them for `WITHDRAW_LIFETIME`, then leave
/// them installed with one log line.
pub(crate) fn withdraw_all(rules: Vec<RuleHandle>) {
    withdraw_within(rules, DEFAULT_DEADLINE, WITHDRAW_LIFETIME);
}

fn withdraw_within(rules: Vec<RuleHandle>, wait: Duration, lifetime: Duration) {
    if rules.is_empty() {
        return;
    }
    let now = Instant::now();
    let n = rules.len();
    let batch = Arc::new(Batch {
        state: Mutex::new(BatchState {
            todo: rules
                .into_iter()
                .map(|rule| Job {
                    rule,
                    not_before: now,
                    backoff: RETRY_FIRST,
                    first: true,
                })
                .collect(),
            unanswered: n,
            workers: 0,
            give_up: now + lifetime,
            abandoned: 0,
            last_error: String::new(),
        }),
        answered: Condvar::new(),
    });
    for _ in 0..n.min(WITHDRAW_THREADS) {
        lock(&batch.state).workers += 1;
        let b = batch.clone();
        let spawned = std::thread::Builder::new()
            .name("tcpx-flow-withdraw".into())
            .spawn(move || b.work());
        if spawned.is_err() {
            lock(&batch.state).workers -= 1;
            break;
        }
    }
    let deadline = now + wait;
    let mut s = lock(&batch.state);
    if s.workers == 0 {
        // No thread to hand them to: withdraw here, giving up after `wait`.
        s.workers = 1;
        s.give_up = deadline;
        drop(s);
        batch.work();
        return;
    }
    while s.unanswered > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s = match batch.answered.wait_timeout(s, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
    }
}

struct Batch {
    state: Mutex<BatchState>,
    /// Signalled as first attempts finish.
    answered: Condvar,
}

struct BatchState {
    todo: VecDeque<Job>,
    /// Rules whose first attempt has not finished.
    unanswered: usize,
    workers: usize,
    /// No attempt starts after this.
    give_up: Instant,
    /// Rules left installed at `give_up`.
    abandoned: usize,
    last_error: String,
}

struct Job {
    rule: RuleHandle,
    not_before: Instant,
    backoff: Duration,
    first: bool,
}

impl Batch {
    /// One worker: withdraws jobs until none is left, retrying failures with
    /// backoff until `give_up`. The last worker out reports the rules left
    /// installed.
    fn work(&self) {
        let mut s = lock(&self.state);
        loop {
            let now = Instant::now();
            if now >= s.give_up {
                s.abandoned += s.todo.len();
                for j in s.todo.drain(..) {
                    let _ = j.rule.detach();
                }
            }
            let Some(next) = s.todo.iter().map(|j| j.not_before).min() else {
                break;
            };
            if next > now {
                let pause = (next - now).min(s.give_up.saturating_duration_since(now));
                drop(s);
                std::thread::sleep(pause);
                s = lock(&self.state);
                continue;
            }
            let Some(mut job) = s
                .todo
                .iter()
                .position(|j| j.not_before <= now)
                .and_then(|i| s.todo.remove(i))
            else {
                continue;
            };
            drop(s);
            let r = job.rule.try_remove();
            s = lock(&self.state);
            if job.first {
                s.unanswered -= 1;
                self.answered.notify_all();
            }
            if let Err(e) = r {
                s.last_error = e.to_string();
                job.not_before = Instant::now() + job.backoff;
                job.backoff = (job.backoff * 2).min(RETRY_MAX);
                job.first = false;
                s.todo.push_back(job);
            }
        }
        s.workers -= 1;
        if s.workers == 0 && s.abandoned > 0 {
            tracing::warn!(
                "gpumemd did not confirm the withdrawal of {} flow-steering rule(s) in time ({}); they stay installed in the daemon",
                s.abandoned,
                s.last_error
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The host path under `prefer`; the error under `require`.
fn fallback(cfg: &Config, why: Error) -> Result<Option<Gpumemd>> {
    if cfg.devmem == DevmemMode::Require {
        tracing::error!("gpumemd unavailable for devmem and TCPX_DEVMEM=require: {why}");
        return Err(why);
    }
    tracing::warn!("gpumemd unavailable for devmem ({why}); using the host path");
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devmem::gpumemd::mock::{Endpoint, Fault, MockConfig, MockGpumemd};
    use flowsteer::gpumemd::GpumemdSteering;
    use flowsteer::Steering;
    use std::net::SocketAddr;

    const DEADLINE: Duration = Duration::from_millis(300);
    const RULES: u16 = 40;

    fn installed(mock: &MockGpumemd) -> Vec<RuleHandle> {
        let s = GpumemdSteering::new(mock.client(DEADLINE), MockConfig::default().gpu_pci);
        (0..RULES)
            .map(|i| {
                let t = FlowTuple::incoming(
                    "127.0.0.1:5000".parse().unwrap(),
                    SocketAddr::from(([127, 0, 0, 2], 6000 + i)),
                );
                s.install(t, 1).unwrap()
            })
            .collect()
    }

    fn eventually(what: &str, within: Duration, cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < within, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_healthy_daemon_has_withdrawn_every_rule_on_return() {
        let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
        let rules = installed(&mock);
        assert_eq!(mock.installed_rules().len(), RULES as usize);
        withdraw_within(rules, DEADLINE, WITHDRAW_LIFETIME);
        assert!(mock.installed_rules().is_empty());
    }

    #[test]
    fn a_hung_daemon_costs_one_deadline_and_is_retried_in_the_background() {
        let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
        let rules = installed(&mock);
        mock.set_fault(Fault::Hang, Some(Endpoint::RuleUninstall));
        let t0 = Instant::now();
        withdraw_within(rules, DEADLINE, WITHDRAW_LIFETIME);
        // One at a time, 40 rules would take 40 deadlines (12 s).
        assert!(
            t0.elapsed() < DEADLINE + Duration::from_secs(1),
            "withdrawing took {:?}",
            t0.elapsed()
        );
        assert_eq!(mock.installed_rules().len(), RULES as usize);
        mock.set_fault(Fault::None, None);
        eventually("background withdrawal", Duration::from_secs(10), || {
            mock.installed_rules().is_empty()
        });
    }

    #[test]
    fn unconfirmed_rules_are_left_installed_after_the_lifetime() {
        let mock = MockGpumemd::start_temp(MockConfig::default()).unwrap();
        let rules = installed(&mock);
        mock.set_fault(Fault::Hang, Some(Endpoint::RuleUninstall));
        withdraw_within(rules, DEADLINE, Duration::from_millis(600));
        // Every attempt has ended by lifetime + one deadline; nothing retries after.
        std::thread::sleep(Duration::from_millis(600) + DEADLINE * 2);
        mock.set_fault(Fault::None, None);
        std::thread::sleep(RETRY_FIRST * 3);
        assert_eq!(mock.installed_rules().len(), RULES as usize);
    }
}
