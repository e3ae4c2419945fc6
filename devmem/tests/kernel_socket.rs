//! The seam's kernel implementation (`KernelSocket`) against the running
//! kernel, and the emulated NIC answering the same calls the same way.
//!
//! No devmem NIC here, so the kernel's answers are those for sockets on
//! loopback: every call reaches the kernel with the option and flag of its
//! ABI, and its errors come back typed. Each test prints what the kernel
//! said; `probe_abi` tells which devmem ABI this kernel knows, and the
//! assertions follow it (an upstream kernel ≥ 6.12 with NET_DEVMEM here).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::io::{self, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use devmem::emu::{EmuConfig, EmuDevmemSocket};
use devmem::pool::{RxPool, PAGE_SIZE};
use devmem::sockabi::{
    control_buffer_len, encode_token_ranges, encode_tx, encode_zerocopy, parse_errqueue, parse_rx,
    probe_abi, release_tokens, return_token_batch, AbiError, DevmemSocket, ErrRecord, Fragment,
    KernelAbi, KernelSocket, TokenRange, TxIov, TxTarget, ZcRange,
};

fn errno(e: &AbiError) -> Option<i32> {
    match e {
        AbiError::DontNeed { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

fn connected() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn kernel(s: &TcpStream, abi: KernelAbi) -> KernelSocket {
    KernelSocket::new(OwnedFd::from(s.try_clone().unwrap()), abi, None)
}

fn emulated(abi: KernelAbi) -> EmuDevmemSocket<io::Cursor<Vec<u8>>> {
    let pool = RxPool::local(4 * PAGE_SIZE).unwrap();
    EmuDevmemSocket::new(io::Cursor::new(Vec::new()), pool, EmuConfig::new(abi)).unwrap()
}

fn upstream_here() -> bool {
    match probe_abi(KernelAbi::Upstream) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("this kernel lacks the upstream devmem ABI: {e}");
            false
        }
    }
}

#[test]
fn the_probe_says_which_abi_this_kernel_speaks() {
    for abi in KernelAbi::ALL {
        match probe_abi(abi) {
            Ok(()) => eprintln!(
                "{abi}: SO_DEVMEM_DONTNEED={} known",
                abi.so_devmem_dontneed()
            ),
            Err(e) => {
                eprintln!("{abi}: {e}");
                assert_eq!(e.raw_os_error(), Some(libc::ENOPROTOOPT), "{e}");
            }
        }
    }
}

#[test]
fn a_non_socket_fd_is_a_typed_enotsock() {
    let f = std::fs::File::open("/dev/null").unwrap();
    for abi in KernelAbi::ALL {
        let mut k = KernelSocket::new(OwnedFd::from(f.try_clone().unwrap()), abi, None);
        let r = [TokenRange { start: 1, count: 1 }];
        let err = return_token_batch(&mut k, &r).unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENOTSOCK), "{err}");
        assert!(
            matches!(err, AbiError::DontNeed { optname, .. } if optname == abi.so_devmem_dontneed())
        );
        // Nothing to return: no syscall, so no error even on a non-socket.
        let ok = return_token_batch(&mut k, &[]).unwrap();
        assert_eq!(ok.requested, 0);
    }
}

/// The emulator's `dontneed` answers what this kernel answers on a TCP
/// socket that holds no tokens: the same return value or errno per input.
#[test]
fn dontneed_answers_of_the_kernel_and_the_emulator_agree() {
    if !upstream_here() {
        return;
    }
    let (_c, s) = connected();
    let mut k = kernel(&s, KernelAbi::Upstream);
    let mut e = emulated(KernelAbi::Upstream);
    let range = |start, count| {
        let mut b = Vec::new();
        encode_token_ranges(&[TokenRange { start, count }], &mut b);
        b
    };
    let mut many = Vec::new();
    encode_token_ranges(&vec![TokenRange { start: 9, count: 1 }; 129], &mut many);
    let cases: [(&str, Vec<u8>); 5] = [
        ("no bytes", Vec::new()),
        ("7 bytes", vec![0; 7]),
        ("one unknown token", range(3, 1)),
        ("1024 unknown tokens", range(100, 1024)),
        ("129 ranges", many),
    ];
    for (what, optval) in cases {
        let answer = |r: io::Result<u32>| r.map_err(|e| e.raw_os_error());
        let from_kernel = answer(k.dontneed(&optval));
        eprintln!("SO_DEVMEM_DONTNEED {what}: kernel {from_kernel:?}");
        assert_eq!(answer(e.dontneed(&optval)), from_kernel, "{what}");
    }
    // What the kernel said, pinned: plain TCP frees nothing, bad lengths are EINVAL.
    assert_eq!(k.dontneed(&range(3, 1)).unwrap(), 0);
    assert_eq!(
        k.dontneed(&[]).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    let rep = release_tokens(&mut k, &[1, 2, 3, 10]).unwrap();
    assert_eq!((rep.calls, rep.requested, rep.freed), (1, 4, Some(0)));
}

#[test]
fn upstream_dontneed_on_udp_is_refused() {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut k = KernelSocket::new(OwnedFd::from(u), KernelAbi::Upstream, None);
    let err = release_tokens(&mut k, &[1]).unwrap_err();
    // EBADF ("not TCP") on devmem kernels, ENOPROTOOPT on older ones.
    assert!(
        matches!(errno(&err), Some(libc::EBADF) | Some(libc::ENOPROTOOPT)),
        "{err}"
    );
}

#[test]
fn the_tcpx_option_reaches_the_kernel() {
    let (_c, s) = connected();
    let mut k = kernel(&s, KernelAbi::Tcpx);
    match release_tokens(&mut k, &[4, 5]) {
        // A TCPX kernel: success, no count reported.
        Ok(rep) => assert_eq!((rep.calls, rep.requested, rep.freed), (1, 2, None)),
        // Any other kernel does not know option 97.
        Err(e) => {
            assert_eq!(errno(&e), Some(libc::ENOPROTOOPT), "{e}");
            assert!(probe_abi(KernelAbi::Tcpx).is_err());
        }
    }
}

/// A flow not steered to a devmem queue: recvmsg(MSG_SOCK_DEVMEM) returns
/// its bytes in the iov and no cmsg, which the parser reads as linear.
#[test]
fn plain_tcp_bytes_come_back_as_linear_fragments() {
    let (mut c, s) = connected();
    c.write_all(b"hello devmem").unwrap();
    let mut data = [0u8; 64];
    let mut control = vec![0u8; control_buffer_len(16)];
    for abi in KernelAbi::ALL {
        if abi == KernelAbi::Upstream {
            c.write_all(b"again").unwrap();
        }
        let mut k = kernel(&s, abi);
        let got = loop {
            match k.recv_devmem(&mut data, &mut control) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => break r.unwrap(),
            }
        };
        assert_eq!(got.control_len, 0);
        let frags = parse_rx(abi, &control[..got.control_len], got.bytes, got.msg_flags).unwrap();
        assert_eq!(
            frags,
            vec![Fragment::Linear {
                len: got.bytes as u32
            }]
        );
        let want: &[u8] = if abi == KernelAbi::Tcpx {
            b"hello devmem"
        } else {
            b"again"
        };
        assert_eq!(&data[..got.bytes], want);
    }
    // Non-blocking: nothing left is EAGAIN, not a hang.
    let e = kernel(&s, KernelAbi::Upstream)
        .recv_devmem(&mut data, &mut control)
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
}

/// A devmem send on a socket with no TX binding: the kernel answers
/// EINVAL for either ABI's cmsg, and so does the emulator for an id
/// nothing is bound under.
#[test]
fn a_devmem_send_without_a_binding_is_einval_from_both() {
    let (c, _s) = connected();
    socket2::SockRef::from(&c).set_nonblocking(true).unwrap();
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let mut host = vec![0u8; 4096];
    for (abi, target) in [
        (KernelAbi::Upstream, TxTarget::Upstream { binding_id: 1 }),
        (
            KernelAbi::Tcpx,
            TxTarget::Tcpx {
                dmabuf_fd: 3,
                offset: 0,
            },
        ),
    ] {
        let base = match abi {
            KernelAbi::Upstream => 0,
            KernelAbi::Tcpx => host.as_mut_ptr() as u64,
        };
        let iov = [TxIov { base, len: 100 }];
        let cmsg = encode_tx(target);
        let k = kernel(&c, abi).send_devmem(&iov, cmsg.as_bytes());
        let k = k.map_err(|e| e.raw_os_error());
        eprintln!("devmem send, {abi} cmsg, no binding: kernel {k:?}");
        assert_eq!(k, Err(Some(libc::EINVAL)), "{abi}");
        let e = emulated(abi).send_devmem(&iov, cmsg.as_bytes());
        assert_eq!(e.map_err(|e| e.raw_os_error()), k, "{abi}");
    }
}

/// A real zero-copy completion from this kernel (a host MSG_ZEROCOPY send
/// on loopback) read through the seam: the emulator's record for the same
/// range is byte for byte the kernel's.
#[test]
fn the_kernels_error_queue_record_is_the_emulators() {
    let (c, mut s) = connected();
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let buf = vec![0x42u8; 10_000];
    for _ in 0..2 {
        // SAFETY: buf is live and unchanged until its completion arrives below.
        let n = unsafe {
            libc::send(
                c.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_ZEROCOPY,
            )
        };
        assert_eq!(n, buf.len() as isize);
    }
    let mut sink = vec![0u8; 20_000];
    io::Read::read_exact(&mut s, &mut sink).unwrap();
    let mut k = kernel(&c, KernelAbi::Upstream);
    let mut control = [0u8; 128];
    let mut records = Vec::new();
    let t = std::time::Instant::now();
    while records
        .iter()
        .map(|(r, _): &(ZcRange, Vec<u8>)| r.count())
        .sum::<u64>()
        < 2
    {
        match k.recv_errqueue(&mut control) {
            Ok(o) => {
                let bytes = control[..o.control_len].to_vec();
                for r in parse_errqueue(&bytes).unwrap() {
                    let ErrRecord::Zerocopy(z) = r else {
                        panic!("{r:?}")
                    };
                    records.push((z, bytes.clone()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(t.elapsed().as_secs() < 5, "no completion from the kernel");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
    for (z, bytes) in &records {
        eprintln!("kernel record {z:?}: {bytes:02x?}");
        // Loopback copies: the kernel says so.
        assert!(z.copied);
        let mut ours = Vec::new();
        encode_zerocopy(*z, false, &mut ours);
        assert_eq!(&ours, bytes, "emulator record differs from the kernel's");
    }
    assert_eq!(records[0].0.lo, 0);
    let e = k.recv_errqueue(&mut control).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
}
