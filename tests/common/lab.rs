//! Two network namespaces joined by veth pairs: one pair per data "NIC"
//! (each its own /24: 10.253.i.1 on the receiver's side, 10.253.i.2 on
//! the sender's) and one for control (10.253.200.x), as TCPX hosts keep
//! control on its own NIC. Made by the test, removed on drop. Needs root
//! and `ip`; rate limits need `tc` (iproute2).

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tcpx::{Config, Handle, Net, NicSpec, RecvComm, SendComm};

pub struct Lab {
    pub rx: String,
    pub tx: String,
    pub nics: usize,
    /// One lab at a time per test binary: the tests measure rates and
    /// deadlines, which veth pairs of other labs sharing two vCPUs skew.
    _alone: MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ip(args: &[&str]) -> bool {
    run("ip", args)
}

/// Why a namespace test cannot run here, if it cannot.
pub fn unavailable(need_tc: bool) -> Option<&'static str> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root to create network namespaces");
    }
    if !run("ip", &["-V"]) {
        return Some("needs `ip` (iproute2)");
    }
    if need_tc && !run("tc", &["-V"]) {
        return Some("needs `tc` (iproute2)");
    }
    None
}

pub const CTRL: usize = 200;

pub fn rx_addr(i: usize) -> String {
    format!("10.253.{i}.1")
}

pub fn tx_addr(i: usize) -> String {
    format!("10.253.{i}.2")
}

fn dev(i: usize) -> String {
    if i == CTRL {
        "ctl".into()
    } else {
        format!("d{i}")
    }
}

impl Lab {
    /// `nics` data veth pairs and a control pair; `None` if `ip` failed.
    pub fn new(nics: usize) -> Option<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let lab = Lab {
            rx: format!("tcpx-lr-{id}"),
            tx: format!("tcpx-lt-{id}"),
            nics,
            _alone: ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()),
        };
        let mut ok = ip(&["netns", "add", &lab.rx]) && ip(&["netns", "add", &lab.tx]);
        for i in (0..nics).chain([CTRL]) {
            let d = dev(i);
            ok =
                ok && ip(&[
                    "link", "add", &d, "netns", &lab.rx, "type", "veth", "peer", "name", &d,
                    "netns", &lab.tx,
                ]) && ip(&[
                    "-n",
                    &lab.rx,
                    "addr",
                    "add",
                    &format!("{}/24", rx_addr(i)),
                    "dev",
                    &d,
                ]) && ip(&[
                    "-n",
                    &lab.tx,
                    "addr",
                    "add",
                    &format!("{}/24", tx_addr(i)),
                    "dev",
                    &d,
                ]) && ip(&["-n", &lab.rx, "link", "set", &d, "up"])
                    && ip(&["-n", &lab.tx, "link", "set", &d, "up"]);
        }
        ok = ok
            && ip(&["-n", &lab.rx, "link", "set", "lo", "up"])
            && ip(&["-n", &lab.tx, "link", "set", "lo", "up"]);
        ok.then_some(lab)
    }

    /// Limits what the sender sends on NIC `i` to `mbit` Mbit/s, as the
    /// issue does (`tbf rate 1gbit burst 32kbit latency 50ms`). A 4 KB
    /// bucket splits every GSO packet (up to 64 KB) and holds the rate
    /// near 0.5 Gbit/s here whatever is asked: a slow NIC, not a precise one.
    pub fn rate(&self, i: usize, mbit: u32) {
        self.tbf(i, mbit, "32kbit", "50ms");
    }

    /// As `rate`, with a 256 KB bucket: the rate holds as asked (checked
    /// up to 3 Gbit/s on this box).
    pub fn rate_exact(&self, i: usize, mbit: u32) {
        self.tbf(i, mbit, "256kb", "10ms");
    }

    fn tbf(&self, i: usize, mbit: u32, burst: &str, latency: &str) {
        let rate = format!("{mbit}mbit");
        assert!(run(
            "ip",
            &[
                "netns",
                "exec",
                &self.tx,
                "tc",
                "qdisc",
                "add",
                "dev",
                &dev(i),
                "root",
                "tbf",
                "rate",
                &rate,
                "burst",
                burst,
                "latency",
                latency,
            ]
        ));
    }

    /// NIC `i`'s link goes down (no FIN, no RST: a cut cable).
    pub fn down(&self, i: usize) {
        assert!(ip(&["-n", &self.rx, "link", "set", &dev(i), "down"]));
    }

    pub fn up(&self, i: usize) {
        assert!(ip(&["-n", &self.rx, "link", "set", &dev(i), "up"]));
    }

    /// The calling thread (and the threads it starts) live in namespace `name`.
    pub fn enter(name: &str) {
        let f = std::fs::File::open(format!("/var/run/netns/{name}")).expect("netns handle");
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }

    /// A config for one side: its data NICs, control on its own NIC, one
    /// progress thread per NIC (2-core CI), the given timeouts.
    pub fn config(&self, rx: bool, peer: Duration, stall: Duration) -> Config {
        config(self.nics, rx, peer, stall)
    }
}

/// [`Lab::config`] for a lab of `nics` data NICs, where no `Lab` is at
/// hand (a child process in one of its namespaces).
pub fn config(nics: usize, rx: bool, peer: Duration, stall: Duration) -> Config {
    let addr = |i| if rx { rx_addr(i) } else { tx_addr(i) };
    let nics: Vec<String> = (0..nics).map(addr).collect();
    let refs: Vec<&str> = nics.iter().map(String::as_str).collect();
    let mut c = Config::loopback(&refs).unwrap();
    c.ctrl_nic = Some(NicSpec::parse(&addr(CTRL)).unwrap());
    c.workers_per_nic = 1;
    c.peer_timeout = Some(peer);
    c.stall_timeout = Some(stall);
    c
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.rx]);
        let _ = ip(&["netns", "del", &self.tx]);
    }
}

/// Runs `recv` on a receiver in the lab's receiving namespace and `send`
/// on a sender in the sending one (this thread), over one comm.
pub fn over<R: Send + 'static>(
    lab: &Lab,
    rx: Config,
    tx: Config,
    recv: impl FnOnce(&Net, RecvComm) -> R + Send + 'static,
    send: impl FnOnce(&Net, SendComm),
) -> R {
    const T: Duration = Duration::from_secs(30);
    let (htx, hrx) = std::sync::mpsc::channel();
    let ns = lab.rx.clone();
    let receiver = std::thread::spawn(move || {
        Lab::enter(&ns);
        let net = Net::init(rx).unwrap();
        let (h, mut l) = net.listen(0).unwrap();
        htx.send(h.to_bytes()).unwrap();
        let comm = l.accept_wait(T).unwrap();
        recv(&net, comm)
    });
    Lab::enter(&lab.tx);
    let net = Net::init(tx).unwrap();
    let mut h = Handle::from_bytes(&hrx.recv().unwrap()).unwrap();
    let comm = net.connect_wait(0, &mut h, T).unwrap();
    send(&net, comm);
    receiver.join().unwrap()
}
