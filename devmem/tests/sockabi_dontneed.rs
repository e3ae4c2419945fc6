//! The SO_DEVMEM_DONTNEED syscall wrapper against the running kernel.
//!
//! No devmem NIC here: these show the call reaches the kernel with the
//! right option and that its errors come back typed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;

use devmem::sockabi::{release_tokens, return_token_batch, AbiError, KernelAbi, TokenRange};

fn errno(e: &AbiError) -> Option<i32> {
    match e {
        AbiError::DontNeed { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

#[test]
fn non_socket_fd_is_a_typed_enotsock() {
    let f = std::fs::File::open("/dev/null").unwrap();
    for abi in KernelAbi::ALL {
        let r = [TokenRange { start: 1, count: 1 }];
        let err = return_token_batch(f.as_fd(), abi, &r).unwrap_err();
        assert_eq!(errno(&err), Some(libc::ENOTSOCK), "{err}");
        assert!(
            matches!(err, AbiError::DontNeed { optname, .. } if optname == abi.so_devmem_dontneed())
        );
        // Nothing to return: no syscall, so no error even on a non-socket.
        let ok = return_token_batch(f.as_fd(), abi, &[]).unwrap();
        assert_eq!(ok.requested, 0);
    }
}

#[test]
fn upstream_dontneed_on_plain_tcp_frees_nothing_or_is_unknown() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    match release_tokens(s.as_fd(), KernelAbi::Upstream, &[1, 2, 3, 10]) {
        // A devmem-capable kernel holds none of these tokens for this socket.
        Ok(rep) => {
            assert_eq!(rep.calls, 1);
            assert_eq!(rep.requested, 4);
            assert_eq!(rep.freed, Some(0));
        }
        // Kernels without devmem; newer ones refuse sockets with no binding.
        Err(e) => {
            let n = errno(&e);
            assert!(
                matches!(n, Some(libc::ENOPROTOOPT) | Some(libc::EINVAL)),
                "{e}"
            );
            eprintln!("kernel refused SO_DEVMEM_DONTNEED=80 on plain TCP: {e}");
        }
    }
}

#[test]
fn upstream_dontneed_on_udp_is_refused() {
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = release_tokens(u.as_fd(), KernelAbi::Upstream, &[1]).unwrap_err();
    // EBADF ("not TCP") on devmem kernels, ENOPROTOOPT on older ones.
    assert!(
        matches!(errno(&err), Some(libc::EBADF) | Some(libc::ENOPROTOOPT)),
        "{err}"
    );
}

#[test]
fn tcpx_option_reaches_the_kernel() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    match release_tokens(s.as_fd(), KernelAbi::Tcpx, &[4, 5]) {
        // A TCPX kernel: success, no count reported.
        Ok(rep) => assert_eq!((rep.calls, rep.requested, rep.freed), (1, 2, None)),
        // Any other kernel does not know option 97.
        Err(e) => assert_eq!(errno(&e), Some(libc::ENOPROTOOPT), "{e}"),
    }
}

#[test]
fn plain_tcp_bytes_come_back_as_linear_fragments() {
    use devmem::sockabi::{control_buffer_len, parse_rx, recv_devmem, Fragment};
    use std::io::Write;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    c.write_all(b"hello devmem").unwrap();
    let mut data = [0u8; 64];
    let mut control = vec![0u8; control_buffer_len(16)];
    for abi in KernelAbi::ALL {
        if abi == KernelAbi::Upstream {
            c.write_all(b"again").unwrap();
        }
        let got = recv_devmem(s.as_fd(), abi, &mut data, &mut control, 0).unwrap();
        // A socket not bound to a devmem queue: bytes in the iov, no cmsgs.
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
}
