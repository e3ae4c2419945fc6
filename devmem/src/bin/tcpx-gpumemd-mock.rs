//! `tcpx-gpumemd-mock`: a stand-in for the receive-datapath daemon, speaking
//! its UNIX-socket protocol with memfd-backed pools and fault switches.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use devmem::gpumemd::mock::{Endpoint, Fault, MockConfig, MockGpumemd};
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str = "\
usage: tcpx-gpumemd-mock [options]

  --prefix DIR          socket directory (default /tmp, as the plugin's
                        NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX)
  --gpu-pci ADDR        GPU PCI address served (default 0000:04:00.0)
  --pool-size BYTES     RX pool size; K/M/G suffixes allowed (default 64M)
  --align BYTES         pool alignment reported (default 2M)
  --queue-ids LIST      comma-separated RX queue ids (default 1,2,3,4)
  --fault NAME[=ARG]    none | accept-then-close | delay-ms=MS | hang |
                        malformed-length | truncated-payload | garbage-payload |
                        unknown-oneof | fd-count=N | wrong-fd-kind | short-pool |
                        refuse-rules | die-after=N
  --fault-on ENDPOINT   gpu-fd | metadata | rule-install | rule-uninstall |
                        queue-ids | registry (default: all)
  --exit-after SECS     stop after SECS seconds (default: until SIGINT/SIGTERM)
";

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

struct Args {
    prefix: PathBuf,
    config: MockConfig,
    exit_after: Option<Duration>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        prefix: PathBuf::from("/tmp"),
        config: MockConfig {
            pool_size: 64 << 20,
            align: 2 << 20,
            ..MockConfig::default()
        },
        exit_after: None,
    };
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value {val:?} for {flag}");
        let c = &mut args.config;
        match flag.as_str() {
            "--prefix" => args.prefix = PathBuf::from(&val),
            "--gpu-pci" => c.gpu_pci = val.clone(),
            "--pool-size" => c.pool_size = parse_size(&val).filter(|s| *s > 0).ok_or_else(bad)?,
            "--align" => c.align = parse_size(&val).ok_or_else(bad)?,
            "--queue-ids" => {
                c.queue_ids = val
                    .split(',')
                    .map(|q| q.trim().parse::<i32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad())?
            }
            "--fault" => c.fault = Fault::parse(&val).ok_or_else(bad)?,
            "--fault-on" => c.fault_on = Some(Endpoint::parse(&val).ok_or_else(bad)?),
            "--exit-after" => {
                args.exit_after = Some(Duration::from_secs(val.parse().map_err(|_| bad())?))
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Block the stop signals before any thread starts, then wait for one:
    // the mock then always gets to remove its socket files.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    if let Err(e) = stop.thread_block() {
        eprintln!("error: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let mock = match MockGpumemd::start(&args.prefix, args.config.clone()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: cannot listen under {}: {e}", args.prefix.display());
            return ExitCode::FAILURE;
        }
    };
    println!(
        "tcpx-gpumemd-mock: serving GPU {} (pool {} bytes, align {}, queues {:?}, fault {:?} on {:?}) under {}",
        args.config.gpu_pci,
        args.config.pool_size,
        args.config.align,
        args.config.queue_ids,
        args.config.fault,
        args.config.fault_on,
        mock.prefix().display()
    );
    if let Some(after) = args.exit_after {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
        });
    }
    match stop.wait() {
        Ok(sig) => println!("tcpx-gpumemd-mock: {sig}, stopping"),
        Err(e) => eprintln!("tcpx-gpumemd-mock: sigwait failed: {e}, stopping"),
    }
    drop(mock);
    ExitCode::SUCCESS
}
