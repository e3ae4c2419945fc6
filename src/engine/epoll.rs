//! The epoll engine: non-blocking syscalls on each ready socket; the worker
//! sleeps in epoll_wait (edge-triggered) and an eventfd wakes it for commands.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use nix::sys::socket::{ControlMessageOwned, MsgFlags};

use super::sock::{Sock, Step};
use super::{Cmd, WatchSet};
use crate::error::{Error, Result};
use crate::stats::Counters;
use crate::zerocopy;

const WAKE_ID: u64 = u64::MAX;
/// Bytes one socket may move per pass over the worker's sockets: a busy
/// socket must not starve the others (their chunks hold up messages too).
const PASS_BUDGET: usize = 1 << 20;
const WATCH_ID: u64 = u64::MAX - 1;

pub(super) struct EpollLoop {
    rx: Receiver<Cmd>,
    wake: Arc<EventFd>,
    sleeping: Arc<AtomicBool>,
    epoll: Epoll,
    socks: HashMap<u64, Sock>,
    /// Sockets with unread zero-copy notifications (EPOLLERR seen).
    errq: Vec<u64>,
    counters: Arc<Counters>,
    watches: Arc<WatchSet>,
    scratch: Vec<u8>,
}

impl EpollLoop {
    pub fn new(
        rx: Receiver<Cmd>,
        wake: Arc<EventFd>,
        sleeping: Arc<AtomicBool>,
        counters: Arc<Counters>,
        watches: Arc<WatchSet>,
    ) -> Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::io("epoll_create", e.into()))?;
        epoll
            .add(wake.as_ref(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_ID))
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        epoll
            .add(
                watches.as_ref(),
                EpollEvent::new(EpollFlags::EPOLLIN, WATCH_ID),
            )
            .map_err(|e| Error::io("epoll_ctl", e.into()))?;
        Ok(EpollLoop {
            rx,
            wake,
            sleeping,
            epoll,
            socks: HashMap::new(),
            errq: Vec::new(),
            counters,
            watches,
            scratch: Vec::new(),
        })
    }

    pub fn run(&mut self) {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            while let Ok(cmd) = self.rx.try_recv() {
                if !self.handle(cmd) {
                    return;
                }
            }
            let mut moved = false;
            for id in std::mem::take(&mut self.errq) {
                if let Some(s) = self.socks.get_mut(&id) {
                    moved |= match s.drain_devmem_tx(&self.counters) {
                        Some(m) => m,
                        None => drain_errqueue(s, &self.counters),
                    };
                }
            }
            for s in self.socks.values_mut() {
                if s.devmem_tx_pending() {
                    moved |= s.drain_devmem_tx(&self.counters).unwrap_or(false);
                }
                moved |= send_ready(s, &self.counters);
                moved |= if s.is_devmem() {
                    recv_devmem_ready(s, &mut self.scratch)
                } else {
                    recv_ready(s, &mut self.scratch)
                };
            }
            if moved {
                continue;
            }
            // Nothing else to do: wait for the copies of landed chunks.
            for s in self.socks.values_mut() {
                moved |= s.settle();
            }
            if moved {
                continue;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            if !self.rx.is_empty() {
                self.sleeping.store(false, Ordering::SeqCst);
                continue;
            }
            // The eventfd and socket edges wake us; the timeout is the next tick.
            let ms = self
                .watches
                .until_tick()
                .as_micros()
                .div_ceil(1000)
                .min(1000) as u16;
            let n = self
                .epoll
                .wait(&mut events, EpollTimeout::from(ms))
                .unwrap_or(0);
            self.sleeping.store(false, Ordering::SeqCst);
            if self.watches.tick_if_due() {
                let now = std::time::Instant::now();
                for s in self.socks.values_mut() {
                    s.tick(now);
                }
            }
            for ev in &events[..n] {
                let id = ev.data();
                if id == WAKE_ID {
                    let _ = self.wake.read();
                } else if id == WATCH_ID {
                    self.watches.dispatch();
                } else if let Some(s) = self.socks.get_mut(&id) {
                    let f = ev.events();
                    let err = f.contains(EpollFlags::EPOLLERR);
                    if err
                        || f.intersects(
                            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP,
                        )
                    {
                        s.readable = true;
                    }
                    if err || f.intersects(EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP) {
                        s.writable = true;
                    }
                    if err {
                        self.errq.push(id);
                    }
                    if err || f.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLRDHUP) {
                        s.hung_up(f.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLRDHUP));
                    }
                }
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
                let flags = EpollFlags::EPOLLIN
                    | EpollFlags::EPOLLOUT
                    | EpollFlags::EPOLLRDHUP
                    | EpollFlags::EPOLLET;
                let dead = self
                    .epoll
                    .add(&stream, EpollEvent::new(flags, id))
                    .err()
                    .map(|e| Error::io("epoll_ctl", e.into()));
                self.socks.insert(
                    id,
                    Sock::new(
                        stream,
                        tx,
                        comm,
                        receives,
                        dead,
                        &self.counters,
                        sock,
                        counters,
                    ),
                );
            }
            Cmd::Kick => {}
            Cmd::Close { id } => {
                if let Some(mut s) = self.socks.remove(&id) {
                    let _ = self.epoll.delete(&s.stream);
                    let _ = s.stream.shutdown(std::net::Shutdown::Both);
                    s.shut();
                }
            }
            Cmd::Shutdown => {
                for (_, mut s) in self.socks.drain() {
                    s.shut();
                }
                return false;
            }
        }
        true
    }
}

/// Sends until the socket would block, has nothing to send or spent its
/// budget for this pass. True if bytes moved.
fn send_ready(s: &mut Sock, counters: &Counters) -> bool {
    let mut moved = false;
    let mut budget = PASS_BUDGET;
    while s.writable && budget > 0 {
        let Some(plan) = s.tx_plan() else { break };
        let [(p0, l0), (p1, l1)] = plan.parts;
        // SAFETY: the plan's pieces are valid for reading while their job holds its region
        // (TxPath contract) and the socket's header cursor is not touched until tx_done.
        let all = unsafe {
            [
                IoSlice::new(super::bytes(p0, l0)),
                IoSlice::new(super::bytes(p1, l1)),
            ]
        };
        let iov = &all[..plan.n];
        let plain = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        let fd = s.stream.as_raw_fd();
        let mut zc_id = None;
        let sent = if let Some(body) = &plan.devmem {
            // Devmem sends are MSG_ZEROCOPY: each one takes the next id.
            s.send_devmem(body, counters).inspect(|_| {
                zc_id = Some(s.tx.zc.tracker.sent());
            })
        } else if plan.zerocopy {
            match nix::sys::socket::sendmsg::<()>(
                fd,
                iov,
                &[],
                plain | MsgFlags::from_bits_retain(libc::MSG_ZEROCOPY),
                None,
            ) {
                Ok(n) => {
                    zc_id = Some(s.tx.zc.tracker.sent());
                    Counters::bump(&counters.zc_sends, 1);
                    Ok(n)
                }
                // optmem exhausted: this send copies, the request still succeeds.
                Err(Errno::ENOBUFS) => {
                    Counters::bump(&counters.zc_enobufs, 1);
                    nix::sys::socket::sendmsg::<()>(fd, iov, &[], plain, None)
                }
                Err(e) => Err(e),
            }
        } else {
            nix::sys::socket::sendmsg::<()>(fd, iov, &[], plain, None)
        };
        match sent {
            Ok(n) => {
                moved = true;
                budget = budget.saturating_sub(n);
                s.tx_done(n, zc_id);
            }
            Err(Errno::EAGAIN) => s.writable = false,
            Err(Errno::EINTR) => {}
            Err(e) => s.tx_failed(e),
        }
    }
    moved
}

/// Receives until the socket would block, waits, or spent its budget for
/// this pass. True if bytes moved.
fn recv_ready(s: &mut Sock, scratch: &mut Vec<u8>) -> bool {
    let mut moved = false;
    let mut budget = PASS_BUDGET;
    while s.readable && budget > 0 {
        let Some(plan) = s.rx_plan(scratch) else {
            break;
        };
        let [(p0, l0), (p1, l1)] = plan.parts;
        // SAFETY: the plan's pieces are valid for writing and not otherwise accessed while
        // their job holds its region (RxPath contract); the header cursor belongs to the socket.
        let mut iov = unsafe {
            [
                IoSliceMut::new(super::bytes_mut(p0, l0)),
                IoSliceMut::new(super::bytes_mut(p1, l1)),
            ]
        };
        match nix::sys::uio::readv(&s.stream, &mut iov) {
            Ok(n) => {
                moved = true;
                budget = budget.saturating_sub(n.max(1));
                s.rx_done(n);
            }
            Err(Errno::EAGAIN) => s.readable = false,
            Err(Errno::EINTR) => {}
            Err(e) => s.rx_failed(e),
        }
    }
    moved
}

/// Receives through the devmem socket (the kernel's or the emulated NIC's)
/// until it would block. True if bytes moved.
fn recv_devmem_ready(s: &mut Sock, scratch: &mut Vec<u8>) -> bool {
    let mut moved = false;
    while s.readable {
        match s.rx_devmem(scratch) {
            Step::Moved => moved = true,
            Step::WouldBlock => s.readable = false,
            Step::Idle => break,
        }
    }
    moved
}

/// Reads zero-copy completions from the error queue and releases the jobs they cover.
fn drain_errqueue(s: &mut Sock, counters: &Counters) -> bool {
    let fd = s.stream.as_raw_fd();
    loop {
        let mut cbuf = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
        let mut dummy = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut dummy)];
        let flags = MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT;
        let done: Vec<zerocopy::Completion> =
            match nix::sys::socket::recvmsg::<()>(fd, &mut iov, Some(&mut cbuf), flags) {
                Ok(msg) => match msg.cmsgs() {
                    Ok(cmsgs) => cmsgs
                        .filter_map(|c| match c {
                            ControlMessageOwned::Ipv4RecvErr(ee, _)
                            | ControlMessageOwned::Ipv6RecvErr(ee, _) => zerocopy::completion(&ee),
                            _ => None,
                        })
                        .collect(),
                    Err(_) => break,
                },
                Err(Errno::EINTR) => continue,
                Err(_) => break, // EAGAIN: drained
            };
        for c in done {
            s.zc_completed(c, counters);
        }
    }
    s.release_zc()
}
