//! Child processes for process-level faults: the test binary runs itself
//! again with a role in the environment, and the parent reads the child's
//! marked stdout lines (the handle, progress) and kills or stops it.

use std::io::Read;
use std::process::{Child, Command, Stdio};

const ROLE: &str = "TCPX_TEST_CHILD";
const ARG: &str = "TCPX_TEST_CHILD_ARG";
/// Marks the child's own lines among the test harness output.
pub const MARK: &str = "TCPX-CHILD:";

/// The role this process was started with, if it is a child.
pub fn role() -> Option<(String, Option<String>)> {
    let role = std::env::var(ROLE).ok()?;
    Some((role, std::env::var(ARG).ok()))
}

/// Runs test `entry` of this binary as a child with `role` (and `arg`).
pub fn spawn(entry: &str, role: &str, arg: Option<&str>) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", entry, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(a) = arg {
        c.env(ARG, a);
    }
    c.spawn().unwrap()
}

/// Prints a line the parent reads with [`line`].
pub fn say(s: &str) {
    use std::io::Write;
    println!("{MARK}{s}");
    std::io::stdout().flush().unwrap();
}

/// The child's next marked line, without the mark.
pub fn line(child: &mut Child) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        assert_eq!(out.read(&mut b).unwrap(), 1, "child exited early");
        if b[0] == b'\n' {
            let s = String::from_utf8(std::mem::take(&mut line)).unwrap();
            if let Some((_, rest)) = s.split_once(MARK) {
                return rest.trim().to_string();
            }
        } else {
            line.push(b[0]);
        }
    }
}

pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A child role: connects to the parent's handle (`hex`) with `net`, says
/// "connected", then sends `len`-byte messages until stopped or killed.
pub fn send_forever(net: &tcpx::Net, hex: &str, len: usize) -> ! {
    let mr = net.reg_mr(tcpx::HostMemory::zeroed(len).unwrap());
    let mut h = tcpx::Handle::from_bytes(&from_hex(hex)).unwrap();
    let send = net.connect_wait(0, &mut h, super::T).unwrap();
    say("connected");
    loop {
        let mut r = send.isend(&mr, 0, len, 0).unwrap().unwrap();
        let _ = r.wait(std::time::Duration::from_secs(3600));
    }
}
