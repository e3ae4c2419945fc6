//! The io_uring engine: each socket has at most one send and one receive in
//! flight as SQEs (order within a TCP stream needs that); the worker submits
//! them in batches and sleeps in io_uring_enter. Zero-copy uses SENDMSG_ZC,
//! whose notification CQE (IORING_CQE_F_NOTIF) releases the buffer.
//!
//! Control-socket watches reuse an epoll set, itself watched by a POLL_ADD.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use nix::errno::Errno;
use nix::sys::eventfd::EventFd;

use super::sock::Sock;
use super::{Cmd, TxMode, WatchSet};
use crate::config::ZeroCopy;
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::zerocopy::Completion;

const RING_ENTRIES: u32 = 256;
const K_SEND: u64 = 1;
const K_RECV: u64 = 2;
const K_WAKE: u64 = 3;
const K_WATCH: u64 = 4;
const K_CANCEL: u64 = 5;
/// Bits of the zero-copy id carried in `user_data` (between the kind and the socket id).
const ZC_BITS: u32 = 24;
/// `IORING_SEND_ZC_REPORT_USAGE` / `IORING_NOTIF_USAGE_ZC_COPIED` (include/uapi/linux/io_uring.h).
const SEND_ZC_REPORT_USAGE: u16 = 8;
const NOTIF_USAGE_ZC_COPIED: i32 = i32::MIN;

fn user_data(id: u64, zc: u32, kind: u64) -> u64 {
    (id << 32) | (((zc & ((1 << ZC_BITS) - 1)) as u64) << 8) | kind
}

fn split(ud: u64) -> (u64, u32, u64) {
    (
        ud >> 32,
        ((ud >> 8) & ((1 << ZC_BITS) - 1)) as u32,
        ud & 0xFF,
    )
}

/// Why io_uring cannot be used here, if it cannot. `TCPX_URING=unavailable`
/// makes the probe fail on purpose (for seccomp'd hosts that crash on it, and tests).
pub(crate) fn probe() -> std::result::Result<(), String> {
    if std::env::var("TCPX_URING").is_ok_and(|v| v == "unavailable") {
        return Err("disabled by TCPX_URING=unavailable".into());
    }
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("io_uring probe: {e}"))?;
    for (name, code) in [
        ("SENDMSG", opcode::SendMsg::CODE),
        ("RECVMSG", opcode::RecvMsg::CODE),
        ("POLL_ADD", opcode::PollAdd::CODE),
        ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
        ("READ", opcode::Read::CODE),
    ] {
        if !p.is_supported(code) {
            return Err(format!("the kernel lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}

/// A socket and the kernel-visible message headers of its in-flight SQEs
/// (boxed: the kernel holds pointers into it until the CQEs arrive).
struct USock {
    sock: Sock,
    tx_msg: libc::msghdr,
    tx_iov: [libc::iovec; 2],
    rx_msg: libc::msghdr,
    rx_iov: [libc::iovec; 2],
    tx_inflight: Option<Option<u32>>,
    rx_inflight: bool,
    /// Zero-copy notifications still to come.
    notifs: u32,
    /// Zero-copy sends of this socket failed with ENOBUFS: copy until the next chunk.
    plain_once: bool,
}

// SAFETY: the raw pointers inside msghdr/iovec point into this box or into
// regions kept alive by the socket's jobs; the box moves between threads only
// inside the worker that owns it.
unsafe impl Send for USock {}

impl USock {
    fn idle(&self) -> bool {
        self.tx_inflight.is_none() && !self.rx_inflight && self.notifs == 0
    }
}

fn empty_msg() -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    unsafe { std::mem::zeroed() }
}

pub(super) struct UringLoop {
    rx: Receiver<Cmd>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    counters: Arc<Counters>,
    ring: IoUring,
    zc_supported: bool,
    socks: HashMap<u64, Box<USock>>,
    /// Closed sockets whose SQEs have not completed yet.
    closing: HashMap<u64, Box<USock>>,
    watches: Arc<WatchSet>,
    wake_buf: Box<[u8; 8]>,
    scratch: Vec<u8>,
}

impl UringLoop {
    pub fn new(
        rx: Receiver<Cmd>,
        wake: Arc<EventFd>,
        sleeping: Arc<AtomicBool>,
        counters: Arc<Counters>,
        watches: Arc<WatchSet>,
    ) -> Result<Self> {
        let ring = IoUring::new(RING_ENTRIES).map_err(|e| Error::io("io_uring_setup", e))?;
        let mut p = Probe::new();
        let zc_supported = ring.submitter().register_probe(&mut p).is_ok()
            && p.is_supported(opcode::SendMsgZc::CODE);
        Ok(UringLoop {
            rx,
            wake,
            sleeping,
            counters,
            ring,
            zc_supported,
            socks: HashMap::new(),
            closing: HashMap::new(),
            watches,
            wake_buf: Box::new([0; 8]),
            scratch: Vec::new(),
        })
    }

    /// Queues an SQE, flushing the submission queue first when it is full.
    fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: every pointer in the entry stays valid until its CQE (see USock, wake_buf).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            if self.ring.submit().is_err() {
                std::thread::yield_now();
            }
        }
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(K_WAKE);
        self.push(&sqe);
    }

    fn arm_watch(&mut self) {
        use std::os::fd::AsFd;
        let sqe = opcode::PollAdd::new(
            types::Fd(self.watches.as_fd().as_raw_fd()),
            libc::POLLIN as u32,
        )
        .build()
        .user_data(K_WATCH);
        self.push(&sqe);
    }

    pub fn run(&mut self) {
        self.arm_wake();
        self.arm_watch();
        loop {
            while let Ok(cmd) = self.rx.try_recv() {
                if !self.handle(cmd) {
                    return;
                }
            }
            self.start_io();
            // Waiting anyway: first let the copies of landed chunks finish.
            let mut settled = false;
            for u in self.socks.values_mut() {
                settled |= u.sock.settle();
            }
            self.sleeping.store(true, Ordering::SeqCst);
            let wait = if self.rx.is_empty() && !settled { 1 } else { 0 };
            let until = self.watches.until_tick();
            let ts = types::Timespec::new()
                .sec(until.as_secs())
                .nsec(until.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(wait, &args) {
                let benign = [libc::EINTR, libc::ETIME, libc::EBUSY];
                if !e.raw_os_error().is_some_and(|c| benign.contains(&c)) {
                    tracing::error!("io_uring_enter: {e}");
                }
            }
            self.sleeping.store(false, Ordering::SeqCst);
            if self.watches.tick_if_due() {
                let now = std::time::Instant::now();
                for u in self.socks.values_mut() {
                    u.sock.tick(now);
                }
            }
            self.reap();
        }
    }

    /// Submits the next send and receive of every socket that has none in flight.
    fn start_io(&mut self) {
        let mut sqes = Vec::new();
        let zc_ok = self.zc_supported;
        for (&id, u) in self.socks.iter_mut() {
            if u.tx_inflight.is_none() && u.sock.wants_tx() {
                if let Some(plan) = u.sock.tx_plan() {
                    for (i, &(p, l)) in plan.parts.iter().enumerate() {
                        u.tx_iov[i] = libc::iovec {
                            iov_base: p as *mut libc::c_void,
                            iov_len: l,
                        };
                    }
                    u.tx_msg = empty_msg();
                    u.tx_msg.msg_iov = u.tx_iov.as_mut_ptr();
                    u.tx_msg.msg_iovlen = plan.n;
                    let fd = types::Fd(u.sock.stream.as_raw_fd());
                    let flags = libc::MSG_NOSIGNAL as u32;
                    let zerocopy = plan.zerocopy && zc_ok && !u.plain_once;
                    let sqe = if zerocopy {
                        let zc = u.sock.tx.zc.tracker.sent();
                        u.tx_inflight = Some(Some(zc));
                        opcode::SendMsgZc::new(fd, &u.tx_msg)
                            .flags(flags)
                            .ioprio(SEND_ZC_REPORT_USAGE)
                            .build()
                            .user_data(user_data(id, zc, K_SEND))
                    } else {
                        u.tx_inflight = Some(None);
                        opcode::SendMsg::new(fd, &u.tx_msg)
                            .flags(flags)
                            .build()
                            .user_data(user_data(id, 0, K_SEND))
                    };
                    sqes.push(sqe);
                }
            }
            if !u.rx_inflight && u.sock.wants_rx() {
                if let Some(plan) = u.sock.rx_plan(&mut self.scratch) {
                    for (i, &(p, l)) in plan.parts.iter().enumerate() {
                        u.rx_iov[i] = libc::iovec {
                            iov_base: p.cast(),
                            iov_len: l,
                        };
                    }
                    u.rx_msg = empty_msg();
                    u.rx_msg.msg_iov = u.rx_iov.as_mut_ptr();
                    u.rx_msg.msg_iovlen = 2;
                    u.rx_inflight = true;
                    let fd = types::Fd(u.sock.stream.as_raw_fd());
                    sqes.push(
                        opcode::RecvMsg::new(fd, &mut u.rx_msg)
                            .build()
                            .user_data(user_data(id, 0, K_RECV)),
                    );
                }
            }
        }
        for sqe in &sqes {
            self.push(sqe);
        }
    }

    /// Shuts the socket down and cancels its SQEs; its jobs fail once the kernel lets go.
    fn close(&mut self, id: u64) {
        let Some(u) = self.socks.remove(&id) else {
            return;
        };
        let _ = u.sock.stream.shutdown(std::net::Shutdown::Both);
        let zc = u.tx_inflight.flatten().unwrap_or(0);
        if u.tx_inflight.is_some() {
            let sqe = opcode::AsyncCancel::new(user_data(id, zc, K_SEND))
                .build()
                .user_data(user_data(id, 0, K_CANCEL));
            self.push(&sqe);
        }
        if u.rx_inflight {
            let sqe = opcode::AsyncCancel::new(user_data(id, 0, K_RECV))
                .build()
                .user_data(user_data(id, 0, K_CANCEL));
            self.push(&sqe);
        }
        self.closing.insert(id, u);
        self.finish_closing();
    }

    /// Fails and frees closed sockets that have nothing left in the kernel.
    fn finish_closing(&mut self) {
        let done: Vec<u64> = self
            .closing
            .iter()
            .filter(|(_, u)| u.idle())
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            if let Some(mut u) = self.closing.remove(&id) {
                u.sock.shut();
            }
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        let (mut rearm_wake, mut rearm_watch) = (false, false);
        for cqe in cqes {
            let (id, zc_low, kind) = split(cqe.user_data());
            let res = cqe.result();
            match kind {
                K_WAKE => {
                    rearm_wake = true;
                }
                K_WATCH => {
                    self.watches.dispatch();
                    rearm_watch = true;
                }
                K_SEND => self.on_send(id, zc_low, res, cqe.flags()),
                K_RECV => self.on_recv(id, res),
                _ => {} // K_CANCEL: the cancelled SQE reports on its own
            }
        }
        self.finish_closing();
        if rearm_wake {
            self.arm_wake();
        }
        if rearm_watch {
            self.arm_watch();
        }
    }

    fn on_send(&mut self, id: u64, zc_low: u32, res: i32, flags: u32) {
        let counters = self.counters.clone();
        let Some(u) = self
            .socks
            .get_mut(&id)
            .or_else(|| self.closing.get_mut(&id))
        else {
            return;
        };
        if cqueue::notif(flags) {
            u.notifs = u.notifs.saturating_sub(1);
            let zc = u.sock.tx.zc.tracker.expand(zc_low, ZC_BITS);
            let copied = res & NOTIF_USAGE_ZC_COPIED != 0;
            u.sock.zc_completed(
                Completion {
                    lo: zc,
                    hi: zc,
                    copied,
                },
                &counters,
            );
            u.sock.release_zc();
            return;
        }
        let zc = u.tx_inflight.take().flatten();
        if zc.is_some() && cqueue::more(flags) {
            u.notifs += 1;
        } else if let Some(zc) = zc {
            // No notification will follow: the buffer is already released.
            u.sock.zc_completed(
                Completion {
                    lo: zc,
                    hi: zc,
                    copied: false,
                },
                &counters,
            );
        }
        if res >= 0 {
            if zc.is_some() {
                Counters::bump(&counters.zc_sends, 1);
            }
            u.plain_once = false;
            u.sock.tx_done(res as usize, zc);
            u.sock.release_zc();
        } else {
            match Errno::from_raw(-res) {
                Errno::EINTR | Errno::EAGAIN | Errno::ECANCELED => {}
                Errno::ENOBUFS if zc.is_some() => {
                    Counters::bump(&counters.zc_enobufs, 1);
                    u.plain_once = true;
                }
                e => u.sock.tx_failed(e),
            }
        }
    }

    fn on_recv(&mut self, id: u64, res: i32) {
        let Some(u) = self
            .socks
            .get_mut(&id)
            .or_else(|| self.closing.get_mut(&id))
        else {
            return;
        };
        u.rx_inflight = false;
        if res >= 0 {
            u.sock.rx_done(res as usize);
        } else {
            match Errno::from_raw(-res) {
                Errno::EINTR | Errno::EAGAIN | Errno::ECANCELED => {}
                e => u.sock.rx_failed(e),
            }
        }
    }

    /// False when the worker must exit.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Add {
                id,
                stream,
                tx,
                comm,
                receives,
                sock,
                counters,
            } => {
                // io_uring honours O_NONBLOCK by failing with EAGAIN; blocking sockets let it wait for readiness.
                let dead = stream
                    .set_nonblocking(false)
                    .err()
                    .map(|e| Error::io("set blocking", e));
                let zerocopy = if self.zc_supported {
                    tx.zerocopy
                } else {
                    ZeroCopy::Off
                };
                self.socks.insert(
                    id,
                    Box::new(USock {
                        sock: Sock::new(
                            stream,
                            TxMode {
                                zerocopy,
                                devmem: None,
                                devmem_tx: None,
                                ..tx
                            },
                            comm,
                            receives,
                            dead,
                            &self.counters,
                            sock,
                            counters,
                        ),
                        tx_msg: empty_msg(),
                        tx_iov: [libc::iovec {
                            iov_base: std::ptr::null_mut(),
                            iov_len: 0,
                        }; 2],
                        rx_msg: empty_msg(),
                        rx_iov: [libc::iovec {
                            iov_base: std::ptr::null_mut(),
                            iov_len: 0,
                        }; 2],
                        tx_inflight: None,
                        rx_inflight: false,
                        notifs: 0,
                        plain_once: false,
                    }),
                );
            }
            Cmd::Kick => {}
            Cmd::Close { id } => self.close(id),
            Cmd::Shutdown => {
                let ids: Vec<u64> = self.socks.keys().copied().collect();
                for id in ids {
                    self.close(id);
                }
                // In-flight SQEs point into the boxes and the jobs' memory: wait for them (bounded).
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while !self.closing.is_empty() && std::time::Instant::now() < deadline {
                    let ts = types::Timespec::new().nsec(10_000_000);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    let _ = self.ring.submitter().submit_with_args(1, &args);
                    self.reap();
                }
                // Whatever the kernel still holds must never be freed under it.
                for (_, u) in self.closing.drain() {
                    tracing::warn!(
                        "io_uring request still in flight at shutdown; leaking its buffers"
                    );
                    std::mem::forget(u);
                }
                return false;
            }
        }
        true
    }
}
