//! NCCL's GDR-mode call pattern through the plugin's own `ncclNetPlugin_v10`
//! table, on one GPU: two processes (receiver and sender, children of this
//! test), CUDA buffers registered with NCCL_PTR_CUDA, grouped receives
//! (NCCL's shape: several buffers, one tag; and distinct tags with a
//! zero-byte message), test loops, iflush, deregMr. While a receive is
//! outstanding a kernel spins on a blocking stream until a word inside the
//! receive buffer changes, with dependent work queued behind it (PyTorch's
//! end event and a consumer stream waiting on it), exactly as NCCL's kernel
//! waits for data; the sender spins one too while it sends. A data path that
//! waits for the GPU deadlocks there: the test then fails by deadline (the
//! kernels have their own). Skips, saying why, without CUDA or NVRTC.
//!
//! The plugin: `$TCPX_NCCL_PLUGIN`, else `libnccl-net-tcpx.so` beside this
//! binary (scripts/gpu-check.sh puts it there), else built with cargo.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::ffi::{c_char, c_int, c_void, CString};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use devmem::cuda::mem::{DeviceBuffer, Event, PinnedBuffer, Stream};
use devmem::cuda::spin::{SpinOutcome, Spinner};
use devmem::cuda::{Context, CudaError};
use rand::{Rng, SeedableRng};

const ROLE: &str = "TCPX_GDR_TEST_ROLE";
const HANDLE: &str = "TCPX_GDR_TEST_HANDLE";
const SEED: &str = "TCPX_GDR_TEST_SEED";
/// Each receive's deadline; the kernels give up later than this.
const T: Duration = Duration::from_secs(20);
const KERNEL_LIMIT: Duration = Duration::from_secs(40);
/// Buffers sit SLOT apart in one registration, as NCCL's protocol buffers do.
const SLOT: usize = 2 << 20;
const NCCL_PTR_CUDA: c_int = 2;

type P = *mut c_void;
type PP = *mut *mut c_void;

/// The prefix of `ncclNet_v10_t` this test calls (net_v10.h order).
#[repr(C)]
struct NetV10 {
    name: *const c_char,
    init: unsafe extern "C" fn(P, P) -> c_int,
    devices: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_properties: unsafe extern "C" fn(c_int, P) -> c_int,
    listen: unsafe extern "C" fn(c_int, P, PP) -> c_int,
    connect: unsafe extern "C" fn(c_int, P, P, PP, PP) -> c_int,
    accept: unsafe extern "C" fn(P, PP, PP) -> c_int,
    reg_mr: unsafe extern "C" fn(P, P, usize, c_int, PP) -> c_int,
    reg_mr_dmabuf: unsafe extern "C" fn(P, P, usize, c_int, u64, c_int, PP) -> c_int,
    dereg_mr: unsafe extern "C" fn(P, P) -> c_int,
    isend: unsafe extern "C" fn(P, P, usize, c_int, P, P, PP) -> c_int,
    irecv: unsafe extern "C" fn(P, c_int, PP, *mut usize, *mut c_int, PP, PP, PP) -> c_int,
    iflush: unsafe extern "C" fn(P, c_int, PP, *mut c_int, PP, PP) -> c_int,
    test: unsafe extern "C" fn(P, *mut c_int, *mut c_int) -> c_int,
    close_send: unsafe extern "C" fn(P) -> c_int,
    close_recv: unsafe extern "C" fn(P) -> c_int,
    close_listen: unsafe extern "C" fn(P) -> c_int,
}

fn ok(rc: c_int, what: &str) {
    assert_eq!(rc, 0, "{what} returned ncclResult {rc}");
}

fn plugin(path: &Path) -> &'static NetV10 {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: dlopen of our plugin; it stays loaded for the process.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {} failed", path.display());
    // SAFETY: a loaded library and a NUL-terminated name.
    let t = unsafe { libc::dlsym(h, c"ncclNetPlugin_v10".as_ptr()) };
    assert!(!t.is_null(), "ncclNetPlugin_v10 not exported");
    // SAFETY: the symbol is a static ncclNet_v10_t whose prefix NetV10 mirrors.
    unsafe { &*t.cast::<NetV10>() }
}

/// One round: the messages of one grouped receive.
struct Round {
    sizes: Vec<usize>,
    posted: Vec<usize>,
    tags: Vec<c_int>,
}

/// The rounds both sides derive from the seed: NCCL's grouped shape (three
/// buffers, one tag, posted at the step size), distinct tags with a
/// zero-byte message, and the first 8-byte all_reduce's lone small receive.
fn rounds(seed: u64) -> Vec<Round> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    vec![
        Round {
            sizes: vec![
                r.gen_range(8..64 << 10) | 1,
                r.gen_range(64 << 10..(3 << 19)) | 1,
                r.gen_range(8..200),
            ],
            posted: vec![1 << 20, 3 << 19, 1 << 20],
            tags: vec![1, 1, 1],
        },
        Round {
            sizes: vec![r.gen_range(8..4096) | 1, r.gen_range(1..70000), 0, 1000003],
            posted: vec![4096 + 13, 70000 + 4099, 4096, 1000003 + 7],
            tags: vec![5, 6, 7, 8],
        },
        Round {
            sizes: vec![24],
            posted: vec![64 << 10],
            tags: vec![1],
        },
    ]
}

/// The 8-aligned offset of the word the receiver's kernel waits for (in
/// message 0) and its value in round `k`.
fn flag(round: &Round, k: usize) -> (usize, u64) {
    (
        (round.sizes[0] - 8) & !7,
        0x7ca9_0000_0000_0001 ^ ((k as u64) << 8),
    )
}

fn payload(seed: u64, k: usize, round: &Round) -> Vec<Vec<u8>> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ ((k as u64 + 1) * 0x9e37_79b9));
    let mut p: Vec<Vec<u8>> = round
        .sizes
        .iter()
        .map(|&n| (0..n).map(|_| r.gen()).collect())
        .collect();
    let (at, v) = flag(round, k);
    p[0][at..at + 8].copy_from_slice(&v.to_le_bytes());
    p
}

/// A registration-sized device buffer, 4 KiB aligned as regMr requires.
fn device(ctx: &'static Context, len: usize) -> (DeviceBuffer, usize) {
    let b = DeviceBuffer::alloc(ctx, len + 4096).unwrap();
    let pad = (4096 - (b.ptr() as usize) % 4096) % 4096;
    (b, pad)
}

/// Dependent work behind a spinning kernel on `s`, as PyTorch queues it:
/// an event after the collective and a consumer stream waiting for it.
/// The returned event completes only after the kernel.
fn queue_behind(ctx: &'static Context, s: &Stream) -> (Event, Stream, Event) {
    let end = Event::new(ctx).unwrap();
    end.record(s).unwrap();
    let consumer = Stream::blocking(ctx).unwrap();
    consumer.wait_event(&end).unwrap();
    let after = Event::new(ctx).unwrap();
    after.record(&consumer).unwrap();
    (end, consumer, after)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "{what} within {T:?}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// test() until done, within T; `on_late` explains a deadline.
fn test_until_done(n: &NetV10, req: P, sizes: *mut c_int, on_late: impl Fn() -> String) {
    let start = Instant::now();
    loop {
        let mut done = 0;
        // SAFETY: a live request of this plugin; sizes is NULL or room for 8.
        ok(unsafe { (n.test)(req, &mut done, sizes) }, "test");
        if done == 1 {
            return;
        }
        assert!(start.elapsed() < T, "{}", on_late());
        std::thread::yield_now();
    }
}

/// Prints why the GPU part cannot run and ends the child successfully.
fn skip(e: CudaError) -> ! {
    println!("SKIP {e}");
    std::process::exit(0);
}

fn receiver(n: &'static NetV10, seed: u64) {
    let ctx = Context::get(0).unwrap_or_else(|e| skip(e));
    let spinner = Spinner::new(ctx).unwrap_or_else(|e| skip(e));
    // SAFETY: NULL logger and profiler are allowed (net_v10.h).
    ok(
        unsafe { (n.init)(std::ptr::null_mut(), std::ptr::null_mut()) },
        "init",
    );
    let mut handle = [0u8; 128];
    let (mut lc, mut rc) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: a 128-byte handle buffer and an out pointer.
    ok(
        unsafe { (n.listen)(0, handle.as_mut_ptr().cast(), &mut lc) },
        "listen",
    );
    let hex: String = handle.iter().map(|b| format!("{b:02x}")).collect();
    println!("HANDLE {hex}");
    wait_until("accept", || {
        // SAFETY: our listen comm and out pointers.
        ok(
            unsafe { (n.accept)(lc, &mut rc, std::ptr::null_mut()) },
            "accept",
        );
        !rc.is_null()
    });
    for (k, round) in rounds(seed).iter().enumerate() {
        let want = payload(seed, k, round);
        let m = round.sizes.len();
        let (buf, pad) = device(ctx, m * SLOT);
        buf.fill(0).unwrap();
        let base = (buf.ptr() as usize + pad) as P;
        let mut mh = std::ptr::null_mut();
        // SAFETY: device memory of m*SLOT bytes that outlives the registration.
        let rc_reg = unsafe { (n.reg_mr)(rc, base, m * SLOT, NCCL_PTR_CUDA, &mut mh) };
        ok(
            rc_reg,
            "regMr(NCCL_PTR_CUDA) (is TCPX_NCCL_GDR=1 honoured?)",
        );
        // The consumer kernel, on a blocking stream, waits for message 0's word.
        let stream = Stream::blocking(ctx).unwrap();
        let (at, v) = flag(round, k);
        // SAFETY: an 8-aligned word inside buf (message 0 lies at offset 0),
        // which lives until after the spin ended (its drop waits).
        let spin =
            unsafe { spinner.launch(&stream, base as u64 + at as u64, v, KERNEL_LIMIT) }.unwrap();
        let (_end, _consumer, after) = queue_behind(ctx, &stream);
        wait_until("the spinning kernel to start", || spin.started());
        let mut ptrs: Vec<P> = (0..m).map(|i| (base as usize + i * SLOT) as P).collect();
        let mut posted = round.posted.clone();
        let mut tags = round.tags.clone();
        let mut mhs = vec![mh; m];
        let mut req = std::ptr::null_mut();
        wait_until("irecv to take the receive", || {
            // SAFETY: arrays of m elements; out pointer.
            let r = unsafe {
                (n.irecv)(
                    rc,
                    m as c_int,
                    ptrs.as_mut_ptr(),
                    posted.as_mut_ptr(),
                    tags.as_mut_ptr(),
                    mhs.as_mut_ptr(),
                    std::ptr::null_mut(),
                    &mut req,
                )
            };
            ok(r, "irecv");
            !req.is_null()
        });
        println!("READY {k}");
        let mut got = [-1 as c_int; 8];
        test_until_done(n, req, got.as_mut_ptr(), || {
            spin.abort();
            format!(
                "round {k}: the receive did not complete while a kernel waited for its data \
                 (kernel: {:?}); the data path waits for the GPU",
                spin.wait(Duration::from_secs(5))
            )
        });
        let sizes: Vec<usize> = got[..m].iter().map(|&s| s as usize).collect();
        assert_eq!(sizes, round.sizes, "round {k}: sizes test() reported");
        assert_eq!(got[m], -1, "round {k}: sizes written past the buffers");
        assert_eq!(
            spin.wait(T),
            Some(SpinOutcome::Seen),
            "round {k}: the kernel never saw the received word"
        );
        after.wait("the work queued behind the kernel", T).unwrap();
        let mut fsizes: Vec<c_int> = got[..m].to_vec();
        let mut freq = 1 as P;
        // SAFETY: arrays of m elements; out pointer.
        let r = unsafe {
            (n.iflush)(
                rc,
                m as c_int,
                ptrs.as_mut_ptr(),
                fsizes.as_mut_ptr(),
                mhs.as_mut_ptr(),
                &mut freq,
            )
        };
        ok(r, "iflush");
        if !freq.is_null() {
            test_until_done(n, freq, std::ptr::null_mut(), || "iflush's request".into());
        }
        for (i, w) in want.iter().enumerate() {
            let mut back = vec![0xeeu8; w.len() + 64];
            buf.read(pad + i * SLOT, &mut back).unwrap();
            assert!(
                back[..w.len()] == w[..],
                "round {k} buffer {i}: bytes differ"
            );
            assert!(
                back[w.len()..].iter().all(|&b| b == 0),
                "round {k} buffer {i}: written past the message"
            );
        }
        // SAFETY: our registration, used by no request now.
        ok(unsafe { (n.dereg_mr)(rc, mh) }, "deregMr");
        let queues = std::env::var("CUDA_DEVICE_MAX_CONNECTIONS").unwrap_or("default".into());
        println!(
            "ROW gdr round {k}, {m} buffers {:?}, hw queues {queues} | byte-exact, kernel saw the data",
            round.sizes
        );
    }
    // SAFETY: our comms, not used again.
    unsafe {
        ok((n.close_recv)(rc), "closeRecv");
        ok((n.close_listen)(lc), "closeListen");
    }
    println!("PASS");
}

fn sender(n: &'static NetV10, seed: u64) {
    let ctx = Context::get(0).unwrap_or_else(|e| skip(e));
    let spinner = Spinner::new(ctx).unwrap_or_else(|e| skip(e));
    // SAFETY: NULL logger and profiler are allowed (net_v10.h).
    ok(
        unsafe { (n.init)(std::ptr::null_mut(), std::ptr::null_mut()) },
        "init",
    );
    let hex = std::env::var(HANDLE).unwrap();
    let mut handle: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut sc = std::ptr::null_mut();
    wait_until("connect", || {
        // SAFETY: the 128-byte handle, NULL config (ignored), out pointers.
        let r = unsafe {
            (n.connect)(
                0,
                std::ptr::null_mut(),
                handle.as_mut_ptr().cast(),
                &mut sc,
                std::ptr::null_mut(),
            )
        };
        ok(r, "connect");
        !sc.is_null()
    });
    let mut stdin = BufReader::new(std::io::stdin());
    // A word nobody writes: the sender's kernel spins until aborted.
    let never = PinnedBuffer::alloc(ctx, 8).unwrap();
    // SAFETY: 8 fresh bytes.
    unsafe { std::ptr::write_bytes(never.as_ptr(), 0, 8) };
    for (k, round) in rounds(seed).iter().enumerate() {
        let data = payload(seed, k, round);
        let m = round.sizes.len();
        let (buf, pad) = device(ctx, m * SLOT);
        for (i, d) in data.iter().enumerate() {
            buf.write(pad + i * SLOT, d).unwrap();
        }
        let base = buf.ptr() as usize + pad;
        let mut mh = std::ptr::null_mut();
        // SAFETY: device memory that outlives the registration.
        ok(
            unsafe { (n.reg_mr)(sc, base as P, m * SLOT, NCCL_PTR_CUDA, &mut mh) },
            "regMr",
        );
        let stream = Stream::blocking(ctx).unwrap();
        // SAFETY: pinned, 8-aligned, alive until after the spin (declared first).
        let spin =
            unsafe { spinner.launch(&stream, never.as_ptr() as u64, 1, KERNEL_LIMIT) }.unwrap();
        let _behind = queue_behind(ctx, &stream);
        wait_until("the spinning kernel to start", || spin.started());
        let mut line = String::new();
        stdin.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("GO {k}"));
        for i in 0..m {
            let mut req = std::ptr::null_mut();
            wait_until("isend to take the message", || {
                // SAFETY: inside the registration; out pointer.
                let r = unsafe {
                    (n.isend)(
                        sc,
                        (base + i * SLOT) as P,
                        round.sizes[i],
                        round.tags[i],
                        mh,
                        std::ptr::null_mut(),
                        &mut req,
                    )
                };
                ok(r, "isend");
                !req.is_null()
            });
            let mut s = [-1 as c_int; 8];
            test_until_done(n, req, s.as_mut_ptr(), || {
                format!("round {k}: send {i} did not complete while a kernel spun on the GPU; the send path waits for the GPU")
            });
            assert_eq!(s[0] as usize, round.sizes[i], "round {k}: sent size");
        }
        spin.abort();
        assert_eq!(spin.wait(T), Some(SpinOutcome::Aborted));
        // SAFETY: our registration, used by no request now.
        ok(unsafe { (n.dereg_mr)(sc, mh) }, "deregMr");
    }
    let mut line = String::new();
    stdin.read_line(&mut line).unwrap();
    // SAFETY: our comm, not used again.
    ok(unsafe { (n.close_send)(sc) }, "closeSend");
}

/// The child's side, when this binary runs as one.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let n = plugin(Path::new(&std::env::var("TCPX_NCCL_PLUGIN").unwrap()));
    let seed: u64 = std::env::var(SEED).unwrap().parse().unwrap();
    match role.as_str() {
        "recv" => receiver(n, seed),
        "send" => sender(n, seed),
        r => panic!("unknown role {r}"),
    }
}

fn plugin_path() -> PathBuf {
    if let Ok(p) = std::env::var("TCPX_NCCL_PLUGIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let beside = exe.with_file_name("libnccl-net-tcpx.so");
    if beside.exists() {
        return beside;
    }
    // target/<profile>/deps/<this> -> target/<profile>/libnccl_net_tcpx.so
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--lib", "--quiet", "-p", "tcpx-nccl-net"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().unwrap().success(), "cargo build --lib failed");
    dir.join("libnccl_net_tcpx.so")
}

fn spawn(role: &str, so: &Path, seed: u64, queues: Option<&str>, handle: Option<&str>) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(SEED, seed.to_string())
        .env("TCPX_NCCL_PLUGIN", so)
        .env("TCPX_NCCL_GDR", "1")
        .env("TCPX_NICS", "127.0.0.1")
        .env_remove("NCCL_SOCKET_IFNAME")
        .env_remove("NCCL_GPUDIRECTTCPX_SOCKET_IFNAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if let Some(q) = queues {
        c.env("CUDA_DEVICE_MAX_CONNECTIONS", q);
    }
    if let Some(h) = handle {
        c.env(HANDLE, h);
    }
    c.spawn().unwrap()
}

/// Relays a child's stdout lines into a channel (and prints them).
fn lines(c: &mut Child, who: &'static str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = c.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            // libtest prints "test child_entry ... " before the child's first line.
            let l = l
                .strip_prefix("test child_entry ... ")
                .map_or(l.clone(), str::to_string);
            // ROW lines go to scripts/gpu-check.sh's table as they are.
            if l.starts_with("ROW ") {
                println!("{l}");
            } else {
                println!("[{who}] {l}");
            }
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs the receiver and the sender, relaying the sender's go-ahead once
/// the receiver's kernel spins and its receive is posted.
fn run_pair(queues: Option<&str>) {
    if let Err(e) = devmem::cuda::probe() {
        println!("skipping: {e}");
        return;
    }
    let so = plugin_path();
    let seed: u64 = rand::random();
    println!(
        "seed {seed}, CUDA_DEVICE_MAX_CONNECTIONS {queues:?}, plugin {}",
        so.display()
    );
    let mut recv = spawn("recv", &so, seed, queues, None);
    let from_recv = lines(&mut recv, "recv");
    let mut send: Option<Child> = None;
    let mut to_send = None;
    let outcome = loop {
        let l = match from_recv.recv_timeout(T + Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => break Err("the receiver stopped talking".to_string()),
        };
        if let Some(r) = l.strip_prefix("SKIP ") {
            println!("skipping: {r}");
            break Ok(());
        } else if let Some(h) = l.strip_prefix("HANDLE ") {
            let mut s = spawn("send", &so, seed, queues, Some(h));
            to_send = s.stdin.take();
            let from_send = lines(&mut s, "send");
            std::thread::spawn(move || from_send.iter().for_each(drop));
            send = Some(s);
        } else if let Some(k) = l.strip_prefix("READY ") {
            let w = to_send.as_mut().expect("sender");
            // A sender that died shows in its exit status below.
            let _ = writeln!(w, "GO {k}");
        } else if l == "PASS" {
            if let Some(w) = to_send.as_mut() {
                let _ = writeln!(w, "BYE");
            }
            break Ok(());
        }
    };
    let st = recv.wait().unwrap();
    let sst = send.map(|mut s| {
        drop(to_send.take());
        s.wait().unwrap()
    });
    outcome.unwrap();
    assert!(st.success(), "receiver failed: {st}");
    if let Some(s) = sst {
        assert!(s.success(), "sender failed: {s}");
    }
}

#[test]
fn gdr_receives_complete_while_kernels_wait_for_them() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    run_pair(None);
}

/// One hardware queue for all streams: our copies share it with the
/// kernel's dependent work (the worst case of stream-to-queue aliasing).
#[test]
fn gdr_receives_complete_with_one_hardware_queue() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    run_pair(Some("1"));
}
