//! tcpx-bench: throughput and latency of the transport.
//!
//! With no arguments: a loopback sweep (4 KiB … 256 MiB) over two loopback
//! "NICs", a progress bar, then a table. `server` / `client <addr>` run the
//! same sweep between two hosts. `tcp-pingpong` is the raw-TCP latency
//! baseline that docs/PERFORMANCE.md compares against.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tcpx::{
    Config, EngineKind, Handle, HostMemory, MemoryRegion, Net, NicSpec, RecvBuf, RecvComm,
    SendComm, ZeroCopy, HANDLE_SIZE,
};

#[derive(Parser, Debug)]
#[command(version, about = "Throughput and latency of the tcpx-rs transport")]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Data NICs (names or addresses, comma list). Default: the environment, else 127.0.0.1,127.0.0.2.
    #[arg(long, global = true)]
    nics: Option<String>,
    /// Data sockets per NIC.
    #[arg(long, global = true)]
    sockets_per_nic: Option<usize>,
    /// Progress threads per NIC.
    #[arg(long, global = true)]
    workers_per_nic: Option<usize>,
    /// Chunk size in bytes (K/M suffixes allowed).
    #[arg(long, global = true)]
    chunk_size: Option<String>,
    /// Smallest message (bytes, K/M/G suffixes).
    #[arg(long, global = true, default_value = "4K")]
    min_size: String,
    /// Largest message.
    #[arg(long, global = true, default_value = "256M")]
    max_size: String,
    /// Bytes moved per size in the throughput phase.
    #[arg(long, global = true, default_value = "512M")]
    bytes_per_size: String,
    /// Messages in flight.
    #[arg(long, global = true, default_value_t = 4)]
    window: usize,
    /// Ping-pongs per size for the latency figures (default: 400 for small
    /// messages, fewer for large ones).
    #[arg(long, global = true)]
    pings: Option<usize>,
    /// Receive path: `host` (kernel TCP) or `devmem-emulated` (the emulated
    /// devmem NIC, upstream ABI; `devmem-emulated-tcpx` for the TCPX kernel ABI).
    #[arg(long, global = true, default_value = "host")]
    path: String,
    /// Progress engine: epoll, uring, auto (default: the environment, else epoll).
    #[arg(long, global = true)]
    engine: Option<String>,
    /// MSG_ZEROCOPY for sends: off, on, auto (default: the environment, else auto).
    #[arg(long, global = true)]
    zerocopy: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Sample the NIC counters every N ms while sending and add the
    /// samples to the JSON output (`timeline`): throughput over time, when
    /// chunks were re-sent and sockets retired (benches/nic-striping.sh).
    #[arg(long, global = true)]
    timeline_ms: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Serve clients' sweeps on ADDR (host:port of the bootstrap socket), each in its own thread.
    Server {
        #[arg(default_value = "0.0.0.0:7477")]
        bind: String,
        /// A client must exchange handles and connect within this long, or it is dropped.
        #[arg(long, default_value_t = 10_000)]
        setup_timeout_ms: u64,
    },
    /// Run the sweep against a server's bootstrap address.
    Client { addr: String },
    /// CPU cost of idle connected comms (heartbeats, ticks) against the
    /// same process with none.
    IdleCost {
        /// Connected comm pairs (each a send and a receive comm).
        #[arg(long, default_value_t = 256)]
        pairs: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// CPU time of one round trip with both ends on this thread (loopback
    /// delivers inside `send`, so nothing waits): tcpx comms against raw
    /// TCP of the same shape, a connection per direction. Immune to the
    /// scheduling noise of ping-pong timing: what our own work costs.
    CpuPerRoundTrip {
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 20000)]
        iters: usize,
    },
    /// Raw TCP ping-pong latency over loopback (the baseline).
    TcpPingpong {
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 20000)]
        iters: usize,
        /// Spin on non-blocking reads instead of sleeping in recv().
        #[arg(long)]
        spin: bool,
        /// One connection per direction, as a comm pair has: each message's
        /// receiver then acknowledges it with a bare ACK, where one
        /// connection carries the ACK on the reply.
        #[arg(long)]
        socket_per_direction: bool,
        /// Spinning reads peek, and the bytes are dropped at the next read
        /// (as tcpx reads its control sockets): the bare ACK a draining
        /// read sends then leaves after the reply.
        #[arg(long, requires = "spin")]
        peek: bool,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Plan {
    sizes: Vec<usize>,
    iters: Vec<usize>,
    pings: Vec<usize>,
    window: usize,
}

#[derive(Serialize, Debug)]
struct Row {
    size: usize,
    iters: usize,
    gbytes_per_s: f64,
    gbits_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds (user + system, both ends: the loopback run is one process) per GB moved.
    cpu_s_per_gb: f64,
}

const T: Duration = Duration::from_secs(60);

/// The NIC counters at one moment (`--timeline-ms`).
#[derive(Serialize, Debug)]
struct Sample {
    /// Wall clock, ms since the Unix epoch (to line up with outside events).
    unix_ms: f64,
    bytes_sent: u64,
    resent_chunks: u64,
    /// Data sockets taken out (stalls and failures).
    retired: u64,
    reconnects: u64,
    nic_bytes_sent: Vec<u64>,
}

fn sample(net: &Net) -> Sample {
    let nics = net.nic_stats();
    let sum = |f: fn(&tcpx::PathStats) -> u64| nics.iter().map(|n| f(&n.counts)).sum();
    Sample {
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3),
        bytes_sent: sum(|c| c.bytes_sent),
        resent_chunks: sum(|c| c.resent_chunks),
        retired: sum(|c| c.stalls + c.failures),
        reconnects: sum(|c| c.reconnects),
        nic_bytes_sent: nics.iter().map(|n| n.counts.bytes_sent).collect(),
    }
}

/// Runs `f`, sampling the counters every `every` meanwhile.
fn sampled<R>(net: &Net, every: Option<u64>, f: impl FnOnce() -> R) -> (R, Vec<Sample>) {
    let Some(ms) = every else {
        return (f(), Vec::new());
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut v = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                v.push(sample(net));
                std::thread::sleep(Duration::from_millis(ms));
            }
            v
        });
        let r = f();
        stop.store(true, std::sync::atomic::Ordering::Release);
        (r, h.join().unwrap_or_default())
    })
}

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn parse_size(s: &str) -> BoxResult<usize> {
    Ok(tcpx::config::parse_size(s)?)
}

fn config(cli: &Cli) -> BoxResult<Config> {
    let mut c = Config::from_env()?;
    if let Some(n) = &cli.nics {
        c.data_nics = NicSpec::parse_list(n)?;
    } else if c.data_nics.is_empty() {
        c.data_nics = NicSpec::parse_list("127.0.0.1,127.0.0.2")?;
    }
    if let Some(k) = cli.sockets_per_nic {
        c.sockets_per_nic = k;
    }
    if let Some(w) = cli.workers_per_nic {
        c.workers_per_nic = w;
    }
    if let Some(cs) = &cli.chunk_size {
        c.chunk_size = parse_size(cs)?;
    }
    c.devmem_emulated = match cli.path.as_str() {
        "host" => c.devmem_emulated,
        "devmem-emulated" => Some(devmem::sockabi::KernelAbi::Upstream),
        "devmem-emulated-tcpx" => Some(devmem::sockabi::KernelAbi::Tcpx),
        p => {
            return Err(
                format!("--path {p:?}: use host, devmem-emulated or devmem-emulated-tcpx").into(),
            )
        }
    };
    if let Some(e) = &cli.engine {
        c.engine = match e.as_str() {
            "epoll" => EngineKind::Epoll,
            "uring" => EngineKind::Uring,
            "auto" => EngineKind::Auto,
            _ => return Err(format!("--engine {e:?}: use epoll, uring or auto").into()),
        };
    }
    if let Some(z) = &cli.zerocopy {
        c.zerocopy = match z.as_str() {
            "off" => ZeroCopy::Off,
            "on" => ZeroCopy::On,
            "auto" => ZeroCopy::Auto,
            _ => return Err(format!("--zerocopy {z:?}: use off, on or auto").into()),
        };
    }
    c.validate()?;
    Ok(c)
}

fn plan(cli: &Cli) -> BoxResult<Plan> {
    let (lo, hi, per) = (
        parse_size(&cli.min_size)?,
        parse_size(&cli.max_size)?,
        parse_size(&cli.bytes_per_size)?,
    );
    if lo == 0 || lo > hi {
        return Err("need 0 < --min-size <= --max-size".into());
    }
    let mut sizes = Vec::new();
    let mut s = lo;
    while s <= hi {
        sizes.push(s);
        s *= 2;
    }
    let iters = sizes.iter().map(|&s| (per / s).clamp(4, 20_000)).collect();
    let pings = sizes
        .iter()
        .map(|&s| cli.pings.unwrap_or(((64 << 20) / s).clamp(5, 400)).max(1))
        .collect();
    Ok(Plan {
        sizes,
        iters,
        pings,
        window: cli.window.max(1),
    })
}

/// Exchanges handles over `boot` and connects both directions within `setup`
/// (reads from `boot` must have their own deadline).
fn endpoint(
    net: &Net,
    mut boot: impl Read + Write,
    setup: Duration,
) -> BoxResult<(SendComm, RecvComm)> {
    let (h, mut listener) = net.listen(0)?;
    boot.write_all(&h.to_bytes())
        .map_err(|e| format!("sending our handle: {e}"))?;
    let mut peer = [0u8; HANDLE_SIZE];
    boot.read_exact(&mut peer).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no handle within {setup:?}")
        }
        _ => format!("reading its handle: {e}"),
    })?;
    let mut peer = Handle::from_bytes(&peer)?;
    std::thread::scope(|s| {
        let acc = s.spawn(move || listener.accept_wait(setup));
        let send = net.connect_wait(0, &mut peer, setup);
        let recv = acc.join().map_err(|_| "accept thread panicked")?;
        Ok((send?, recv?))
    })
}

/// Clients served at once; more are turned away until one finishes.
const MAX_CLIENTS: usize = 8;

/// Serves each client in its own thread: a bad, idle or vanished client costs
/// one log line and its own thread, never the server or the other clients.
fn serve(net: Arc<Net>, l: TcpListener, setup: Duration) -> ! {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let (boot, peer) = match l.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tcpx-bench server: accept: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::AcqRel);
            eprintln!("client {peer}: dropped: {MAX_CLIENTS} clients are being served");
            continue;
        }
        let slot = Slot(busy.clone());
        let net = net.clone();
        let spawned = std::thread::Builder::new()
            .name("tcpx-bench-client".into())
            .spawn(move || {
                let _slot = slot;
                match serve_client(&net, boot, setup) {
                    Ok(()) => eprintln!("client {peer}: sweep served"),
                    Err(e) => eprintln!("client {peer}: dropped: {e}"),
                }
            });
        if let Err(e) = spawned {
            eprintln!("client {peer}: dropped: no thread for it ({e})");
        }
    }
}

/// One client's place among `MAX_CLIENTS`, given back however its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_client(net: &Net, boot: TcpStream, setup: Duration) -> BoxResult<()> {
    boot.set_read_timeout(Some(setup))?;
    boot.set_write_timeout(Some(setup))?;
    let (tx, rx) = endpoint(net, boot, setup)?;
    run_receiver(net, &tx, &rx)
}

fn send_msg(tx: &SendComm, mr: &MemoryRegion, len: usize) -> tcpx::Result<tcpx::Request> {
    loop {
        if let Some(r) = tx.isend(mr, 0, len, 0)? {
            return Ok(r);
        }
        std::thread::yield_now();
    }
}

fn recv_msg(rx: &RecvComm, mr: &MemoryRegion, len: usize) -> tcpx::Result<tcpx::Request> {
    loop {
        if let Some(r) = rx.irecv(&[RecvBuf {
            mr,
            offset: 0,
            len,
            tag: 0,
        }])? {
            return Ok(r);
        }
        std::thread::yield_now();
    }
}

/// Drives the sweep; returns one row per size.
fn run_sender(
    net: &Net,
    tx: &SendComm,
    rx: &RecvComm,
    plan: &Plan,
    bar: &ProgressBar,
) -> BoxResult<Vec<Row>> {
    let pj = serde_json::to_vec(plan)?;
    let pmr = net.reg_mr(HostMemory::from_slice(&pj)?);
    send_msg(tx, &pmr, pj.len())?.wait(T)?;
    let max = plan.sizes.iter().copied().max().unwrap_or(0);
    let mut buf = HostMemory::zeroed(max)?;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let src = net.reg_mr(buf);
    let back = net.reg_mr(HostMemory::zeroed(max.max(1))?);
    let mut rows = Vec::new();
    for (k, &size) in plan.sizes.iter().enumerate() {
        bar.set_message(format!("{} x {}", human(size), plan.iters[k]));
        // Throughput: keep `window` messages in flight, then wait for the receiver's ack.
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let mut inflight = std::collections::VecDeque::new();
        for _ in 0..plan.iters[k] {
            if inflight.len() == plan.window {
                let mut r: tcpx::Request = inflight.pop_front().ok_or("empty window")?;
                r.wait(T)?;
            }
            inflight.push_back(send_msg(tx, &src, size)?);
        }
        for mut r in inflight {
            r.wait(T)?;
        }
        recv_msg(rx, &back, 0)?.wait(T)?;
        let secs = t0.elapsed().as_secs_f64();
        let gb = (size * plan.iters[k]) as f64 / 1e9;
        let cpu_s_per_gb = (cpu_seconds() - cpu0) / gb;
        let gbps = gb / secs;
        // Latency: ping-pong, one-way time = round trip / 2.
        let mut lat = Vec::with_capacity(plan.pings[k]);
        for _ in 0..plan.pings[k] {
            let t = Instant::now();
            let mut r = recv_msg(rx, &back, size)?;
            send_msg(tx, &src, size)?.wait(T)?;
            r.wait(T)?;
            lat.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
        }
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        rows.push(Row {
            size,
            iters: plan.iters[k],
            gbytes_per_s: gbps,
            gbits_per_s: gbps * 8.0,
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            cpu_s_per_gb,
        });
        bar.set_message(format!("{}: {gbps:.2} GB/s", human(size)));
        bar.inc(1);
    }
    Ok(rows)
}

/// Mirrors run_sender: receives the plan, then each step.
fn run_receiver(net: &Net, tx: &SendComm, rx: &RecvComm) -> BoxResult<()> {
    let pmr = net.reg_mr(HostMemory::zeroed(64 * 1024)?);
    let mut pmr = pmr;
    let n = recv_msg(rx, &pmr, 64 * 1024)?.wait(T)?[0] as usize;
    let plan: Plan = serde_json::from_slice(&pmr.bytes()?[..n])?;
    let max = plan.sizes.iter().copied().max().unwrap_or(0);
    let dst = net.reg_mr(HostMemory::zeroed(max.max(1))?);
    let ack = net.reg_mr(HostMemory::zeroed(1)?);
    for (k, &size) in plan.sizes.iter().enumerate() {
        let mut inflight = std::collections::VecDeque::new();
        for _ in 0..plan.iters[k] {
            if inflight.len() == plan.window {
                let mut r: tcpx::Request = inflight.pop_front().ok_or("empty window")?;
                r.wait(T)?;
            }
            inflight.push_back(recv_msg(rx, &dst, size)?);
        }
        for mut r in inflight {
            r.wait(T)?;
        }
        send_msg(tx, &ack, 0)?.wait(T)?;
        for _ in 0..plan.pings[k] {
            recv_msg(rx, &dst, size)?.wait(T)?;
            send_msg(tx, &dst, size)?.wait(T)?;
        }
    }
    Ok(())
}

/// User + system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    let u = rusage(libc::RUSAGE_SELF);
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// getrusage(2) for `who` (RUSAGE_SELF, RUSAGE_THREAD).
fn rusage(who: libc::c_int) -> libc::rusage {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid rusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` with a valid out pointer.
    unsafe { libc::getrusage(who, &mut u) };
    u
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn report(cli: &Cli, cfg: &Config, net: &Net, rows: &[Row], timeline: &[Sample]) -> BoxResult<()> {
    let (engine, stats, nics) = (net.engine(), net.stats(), net.nic_stats());
    if cli.json {
        let out = serde_json::json!({
            "nics": cfg.data_nics.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>(),
            "sockets_per_nic": cfg.sockets_per_nic,
            "workers_per_nic": cfg.workers_per_nic,
            "chunk_size": cfg.chunk_size,
            "zerocopy": format!("{:?}", cfg.zerocopy),
            "engine": format!("{:?}", engine),
            "window": cli.window,
            "stats": stats,
            "nic_stats": nics,
            "results": rows,
            "timeline": timeline,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "tcpx-bench: {} NIC(s) x {} socket(s) x {} worker(s), chunk {}, window {}, engine {:?}, zerocopy {:?}",
        cfg.data_nics.len(),
        cfg.sockets_per_nic,
        cfg.workers_per_nic,
        human(cfg.chunk_size),
        cli.window,
        engine,
        cfg.zerocopy
    );
    println!(
        "{:>10} {:>7} {:>9} {:>9} {:>11} {:>11} {:>9}",
        "size", "iters", "GB/s", "Gb/s", "p50 us", "p99 us", "CPU s/GB"
    );
    for r in rows {
        println!(
            "{:>10} {:>7} {:>9.3} {:>9.2} {:>11.1} {:>11.1} {:>9.3}",
            human(r.size),
            r.iters,
            r.gbytes_per_s,
            r.gbits_per_s,
            r.p50_us,
            r.p99_us,
            r.cpu_s_per_gb
        );
    }
    print_nics(&nics);
    if stats.devmem_fragments > 0 {
        println!(
            "devmem (emulated): {} pool fragments, {} tokens returned in {} DONTNEED calls ({:.1} per call), {} linear bytes",
            stats.devmem_fragments,
            stats.devmem_tokens_returned,
            stats.devmem_dontneed_calls,
            stats.devmem_tokens_returned as f64 / stats.devmem_dontneed_calls.max(1) as f64,
            stats.devmem_linear_bytes
        );
    }
    if stats.zerocopy_sends > 0 {
        println!(
            "zero-copy: {} sends, {} completions copied by the kernel, {} truly zero-copy, {} ENOBUFS fallbacks, {} sockets switched to plain sends",
            stats.zerocopy_sends,
            stats.zerocopy_reported_copied,
            stats.zerocopy_reported_zero_copy,
            stats.zerocopy_enobufs_fallbacks,
            stats.sockets_switched_to_plain
        );
    }
    Ok(())
}

/// Per NIC: what its data sockets carried, and what went wrong.
fn print_nics(nics: &[tcpx::NicStats]) {
    println!(
        "{:>4} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>7} {:>8} {:>10}",
        "nic",
        "name",
        "sent MB",
        "chunks",
        "recv MB",
        "chunks",
        "resent",
        "dropped",
        "stalls",
        "failures",
        "reconnects"
    );
    for n in nics {
        let c = &n.counts;
        println!(
            "{:>4} {:>12} {:>10.1} {:>10} {:>10.1} {:>10} {:>8} {:>8} {:>7} {:>8} {:>10}",
            n.nic,
            n.name,
            c.bytes_sent as f64 / 1e6,
            c.chunks_sent,
            c.bytes_received as f64 / 1e6,
            c.chunks_received,
            c.resent_chunks,
            c.duplicates_dropped,
            c.stalls,
            c.failures,
            c.reconnects
        );
    }
}

fn progress(cli: &Cli, n: usize) -> ProgressBar {
    if cli.json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} sizes  {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// read_exact that optionally spins on a non-blocking socket.
fn read_full(s: &mut TcpStream, b: &mut [u8], spin: bool) -> std::io::Result<()> {
    if !spin {
        return s.read_exact(b);
    }
    let mut at = 0;
    while at < b.len() {
        match s.read(&mut b[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A spinning reader that peeks a whole message and drops it from the
/// socket only at its next read.
struct PeekReader {
    owed: usize,
}

impl PeekReader {
    fn read_full(&mut self, s: &TcpStream, b: &mut [u8]) -> std::io::Result<()> {
        use nix::sys::socket::{recv, MsgFlags};
        let fd = s.as_raw_fd();
        while self.owed > 0 {
            let len = self.owed.min(b.len());
            let n = recv(fd, &mut b[..len], MsgFlags::MSG_TRUNC)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.owed -= n.min(self.owed);
        }
        loop {
            match recv(fd, b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) if n == b.len() => {
                    self.owed = n;
                    return Ok(());
                }
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => std::hint::spin_loop(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn tcp_pingpong(
    size: usize,
    iters: usize,
    spin: bool,
    per_direction: bool,
    peek: bool,
    json: bool,
) -> BoxResult<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    // Blocking reads are the plain path; peeking needs spinning reads.
    let read = move |r: &mut PeekReader, s: &mut TcpStream, b: &mut [u8]| {
        if peek {
            r.read_full(s, b)
        } else {
            read_full(s, b, spin)
        }
    };
    // (pinger's out, echo's in) and (echo's out, pinger's in).
    let (mut ping_out, mut echo_in) = loopback_pair(&l, spin)?;
    let (mut echo_out, mut ping_in) = if per_direction {
        loopback_pair(&l, spin)?
    } else {
        (echo_in.try_clone()?, ping_out.try_clone()?)
    };
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut b = vec![0u8; size];
        let mut r = PeekReader { owed: 0 };
        for _ in 0..iters {
            read(&mut r, &mut echo_in, &mut b)?;
            echo_out.write_all(&b)?;
        }
        Ok(())
    });
    let mut b = vec![1u8; size];
    let mut lat = Vec::with_capacity(iters);
    let mut r = PeekReader { owed: 0 };
    for _ in 0..iters {
        let t = Instant::now();
        ping_out.write_all(&b)?;
        read(&mut r, &mut ping_in, &mut b)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    echo.join().map_err(|_| "echo thread panicked")??;
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (lat[lat.len() / 2], lat[(lat.len() - 1) * 99 / 100]);
    if json {
        println!(
            "{}",
            serde_json::json!({"size": size, "iters": iters, "spin": spin,
                "socket_per_direction": per_direction, "peek": peek, "p50_us": p50, "p99_us": p99})
        );
    } else {
        let how = match (spin, peek) {
            (true, true) => "spinning, peeking",
            (true, false) => "spinning",
            _ => "blocking",
        };
        let conns = if per_direction {
            "a connection per direction"
        } else {
            "one connection"
        };
        println!(
            "raw TCP ping-pong {size} B ({how}, {conns}): p50 {p50:.1} us, p99 {p99:.1} us (one way)"
        );
    }
    Ok(())
}

/// A connection to `l` (this process listens): both ends, TCP_NODELAY.
fn loopback_pair(l: &TcpListener, nonblocking: bool) -> std::io::Result<(TcpStream, TcpStream)> {
    let c = TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    for x in [&c, &s] {
        x.set_nodelay(true)?;
        x.set_nonblocking(nonblocking)?;
    }
    Ok((c, s))
}

/// This thread's CPU so far: (user, user + system) nanoseconds.
fn thread_cpu_ns() -> (u64, u64) {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    let u = rusage(libc::RUSAGE_THREAD);
    let user = u.ru_utime.tv_sec as u64 * 1_000_000_000 + u.ru_utime.tv_usec as u64 * 1000;
    (user, t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64)
}

/// CPU per iteration of `f` over `iters`: (user, total) nanoseconds.
fn cpu_per(iters: usize, mut f: impl FnMut() -> BoxResult<()>) -> BoxResult<(f64, f64)> {
    let (u0, t0) = thread_cpu_ns();
    for _ in 0..iters {
        f()?;
    }
    let (u1, t1) = thread_cpu_ns();
    let n = iters as f64;
    Ok(((u1 - u0) as f64 / n, (t1 - t0) as f64 / n))
}

fn cpu_per_round_trip(cli: &Cli, size: usize, iters: usize) -> BoxResult<()> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let (mut x_out, mut x_in) = loopback_pair(&l, true)?;
    let (mut y_out, mut y_in) = loopback_pair(&l, true)?;
    let mut b = vec![1u8; size];
    let mut raw = || {
        cpu_per(iters, || {
            x_out.write_all(&b)?;
            read_full(&mut x_in, &mut b, true)?;
            y_out.write_all(&b)?;
            read_full(&mut y_in, &mut b, true)?;
            Ok(())
        })
    };
    let net = Net::init(config(cli)?)?;
    let (ping_tx, ping_rx) = comm_pair(&net)?;
    let (pong_tx, pong_rx) = comm_pair(&net)?;
    let m = |n| -> BoxResult<MemoryRegion> { Ok(net.reg_mr(HostMemory::zeroed(n)?)) };
    let (a_src, a_dst, b_src, b_dst) = (m(size)?, m(size)?, m(size)?, m(size)?);
    let ours = || {
        cpu_per(iters, || {
            let mut back = recv_msg(&pong_rx, &a_dst, size)?;
            send_msg(&ping_tx, &a_src, size)?.wait(T)?;
            recv_msg(&ping_rx, &b_dst, size)?.wait(T)?;
            send_msg(&pong_tx, &b_src, size)?.wait(T)?;
            back.wait(T)?;
            Ok(())
        })
    };
    // Alternated, best of three: the least disturbed run of each. User
    // time is ours alone; the kernel's share moves with where softirqs run.
    let min = |a: (f64, f64), b: (f64, f64)| (a.0.min(b.0), a.1.min(b.1));
    let (mut r, mut o) = ((f64::MAX, f64::MAX), (f64::MAX, f64::MAX));
    for _ in 0..3 {
        r = min(r, raw()?);
        o = min(o, ours()?);
    }
    let extra_user = (o.0 - r.0) / 2.0;
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"size": size, "iters": iters,
                "raw_user_ns": r.0, "raw_ns": r.1, "tcpx_user_ns": o.0, "tcpx_ns": o.1,
                "ratio": o.1 / r.1, "extra_user_ns_per_message": extra_user})
        );
    } else {
        println!(
            "CPU per {size} B round trip: tcpx {:.0} ns ({:.0} user), raw TCP with a connection per direction {:.0} ns ({:.0} user): {:.2}x; {extra_user:.0} user ns more per message",
            o.1, o.0, r.1, r.0, o.1 / r.1
        );
    }
    Ok(())
}

/// A send comm and the receive comm it connects to, both of `net`.
fn comm_pair(net: &Net) -> BoxResult<(SendComm, RecvComm)> {
    let (h, mut l) = net.listen(0)?;
    let mut h = Handle::from_bytes(&h.to_bytes())?;
    std::thread::scope(|s| -> BoxResult<(SendComm, RecvComm)> {
        let acc = s.spawn(move || l.accept_wait(T));
        let send = net.connect_wait(0, &mut h, T)?;
        let recv = acc.join().map_err(|_| "accept thread panicked")??;
        Ok((send, recv))
    })
}

/// Percent of one core this process used over `secs` seconds of sleep.
fn cpu_percent_over(secs: u64) -> f64 {
    let c0 = cpu_seconds();
    std::thread::sleep(Duration::from_secs(secs));
    (cpu_seconds() - c0) * 100.0 / secs as f64
}

fn idle_cost(cli: &Cli, pairs: usize, secs: u64) -> BoxResult<()> {
    // Each pair holds a dozen fds or more.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let net = Net::init(config(cli)?)?;
    let none = cpu_percent_over(secs);
    let mut comms = Vec::with_capacity(pairs);
    let bar = progress(cli, pairs);
    bar.set_message("connecting");
    for _ in 0..pairs {
        comms.push(comm_pair(&net)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    std::thread::sleep(Duration::from_secs(1));
    let busy = cpu_percent_over(secs);
    let timeout = net.config().peer_timeout.map_or(0, |t| t.as_millis());
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"pairs": pairs, "seconds": secs, "peer_timeout_ms": timeout,
                "cpu_percent_idle_comms": busy, "cpu_percent_no_comms": none})
        );
    } else {
        println!(
            "{pairs} idle comm pairs ({} comms, peer timeout {timeout} ms): {busy:.2} % of a core; with none: {none:.2} %",
            2 * pairs
        );
    }
    drop(comms);
    Ok(())
}

fn main() -> BoxResult<()> {
    let cli = Cli::parse();
    // TCPX_LOG, else the NCCL/UCCL debug variables (tcpx::LogFilter).
    let filter = tcpx::LogFilter::from_env();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter.directive).map_err(|e| {
                format!(
                    "log filter {:?} (from {}): {e}",
                    filter.directive, filter.from
                )
            })?,
        )
        .with_writer(std::io::stderr)
        .init();
    match &cli.mode {
        Some(Mode::IdleCost { pairs, seconds }) => idle_cost(&cli, *pairs, *seconds),
        Some(Mode::CpuPerRoundTrip { size, iters }) => cpu_per_round_trip(&cli, *size, *iters),
        Some(Mode::TcpPingpong {
            size,
            iters,
            spin,
            socket_per_direction,
            peek,
        }) => tcp_pingpong(*size, *iters, *spin, *socket_per_direction, *peek, cli.json),
        Some(Mode::Server {
            bind,
            setup_timeout_ms,
        }) => {
            let cfg = config(&cli)?;
            let net = Arc::new(Net::init(cfg)?);
            let l = TcpListener::bind(bind)?;
            eprintln!("tcpx-bench server: waiting on {}", l.local_addr()?);
            serve(net, l, Duration::from_millis(*setup_timeout_ms))
        }
        Some(Mode::Client { addr }) => {
            let cfg = config(&cli)?;
            let plan = plan(&cli)?;
            let net = Net::init(cfg.clone())?;
            let boot = TcpStream::connect(addr)?;
            boot.set_read_timeout(Some(T))?;
            let (tx, rx) = endpoint(&net, boot, T)?;
            let bar = progress(&cli, plan.sizes.len());
            let (rows, timeline) = sampled(&net, cli.timeline_ms, || {
                run_sender(&net, &tx, &rx, &plan, &bar)
            });
            bar.finish_and_clear();
            report(&cli, &cfg, &net, &rows?, &timeline)
        }
        None => {
            let cfg = config(&cli)?;
            let plan = plan(&cli)?;
            let net = Net::init(cfg.clone())?;
            let (a, b) = UnixStream::pair()?;
            a.set_read_timeout(Some(T))?;
            b.set_read_timeout(Some(T))?;
            let (rows, timeline) = sampled(&net, cli.timeline_ms, || {
                std::thread::scope(|s| -> BoxResult<Vec<Row>> {
                    let netr = &net;
                    let server = s.spawn(move || -> Result<(), String> {
                        let (tx, rx) = endpoint(netr, b, T).map_err(|e| e.to_string())?;
                        run_receiver(netr, &tx, &rx).map_err(|e| e.to_string())
                    });
                    let (tx, rx) = endpoint(&net, a, T)?;
                    let bar = progress(&cli, plan.sizes.len());
                    let rows = run_sender(&net, &tx, &rx, &plan, &bar);
                    bar.finish_and_clear();
                    server.join().map_err(|_| "receiver thread panicked")??;
                    rows
                })
            });
            report(&cli, &cfg, &net, &rows?, &timeline)
        }
    }
}
