//! Every struct that crosses the devmem seam, against the C compiler.
//!
//! A small C program (system `cc`) lays out each struct with the C
//! declarations (the system headers where they have them; this machine's
//! 6.1 headers predate devmem, so the devmem structs are declared as the
//! kernel's uapi and the TCPX plugin declare them) and builds control
//! buffers with the `CMSG_*` macros, as a kernel or the original plugin
//! would. The Rust side must parse those bytes and produce the same bytes.
//! Skips (with a message) when `cc` is missing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on failure

use std::collections::HashMap;
use std::process::Command;

use devmem::gpumemd::PoolMetadata;
use devmem::sockabi::cmsg::{cmsg_len, cmsg_space, CMSG_HDR_LEN};
use devmem::sockabi::errqueue::{OFFENDER_V4_LEN, OFFENDER_V6_LEN, SOCK_EE_LEN};
use devmem::sockabi::{
    encode_rx, encode_token_ranges, encode_tx, encode_zerocopy, parse_errqueue, parse_rx,
    ErrRecord, Fragment, KernelAbi, TokenRange, TxTarget, ZcRange,
};

const PROG: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <linux/errqueue.h>
#include <linux/netlink.h>
#include <linux/genetlink.h>
#include <linux/ioctl.h>

/* include/uapi/linux/uio.h (Linux >= 6.12) */
struct dmabuf_cmsg { uint64_t frag_offset; uint32_t frag_size; uint32_t frag_token;
                     uint32_t dmabuf_id; uint32_t flags; };
struct dmabuf_token { uint32_t token_start; uint32_t token_count; };
/* google/nccl-plugin-gpudirecttcpx src/sock/tcpx.h, src/devcomm/unpack_defs1.h */
struct devmemvec { uint32_t frag_offset; uint32_t frag_size; uint32_t frag_token; };
struct devmemtoken { uint32_t token_start; uint32_t token_count; };
/* google/nccl-plugin-gpudirecttcpx src/gpu/tx_pool.cu */
struct dma_buf_create_pages_info { __u64 pci_bdf[3]; __s32 dma_buf_fd; __s32 create_page_pool; };
#define DMA_BUF_CREATE_PAGES _IOW('b', 2, struct dma_buf_create_pages_info)
/* tcpgpudmarxd include/ipc_gpumem_fd_metadata.h */
struct IpcGpuMemFdMetadata { int fd; size_t size; size_t align; };

#define S(t) printf("sizeof_%s %zu\n", #t, sizeof(struct t));
#define O(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(struct t, f));
static void hex(const char *name, const void *p, size_t n) {
    printf("%s ", name);
    for (size_t i = 0; i < n; i++) printf("%02x", ((const unsigned char *)p)[i]);
    printf("\n");
}
int main(void) {
    S(cmsghdr) S(dmabuf_cmsg) S(dmabuf_token) S(devmemvec) S(devmemtoken)
    S(sock_extended_err) S(sockaddr_in) S(sockaddr_in6) S(IpcGpuMemFdMetadata)
    S(nlmsghdr) S(genlmsghdr) S(nlattr) S(iovec) S(msghdr) S(dma_buf_create_pages_info)
    O(dma_buf_create_pages_info, pci_bdf) O(dma_buf_create_pages_info, dma_buf_fd)
    O(dma_buf_create_pages_info, create_page_pool)
    printf("DMA_BUF_CREATE_PAGES %lu\n", (unsigned long)DMA_BUF_CREATE_PAGES);
    O(cmsghdr, cmsg_len) O(cmsghdr, cmsg_level) O(cmsghdr, cmsg_type)
    O(dmabuf_cmsg, frag_offset) O(dmabuf_cmsg, frag_size) O(dmabuf_cmsg, frag_token)
    O(dmabuf_cmsg, dmabuf_id) O(dmabuf_cmsg, flags)
    O(devmemvec, frag_offset) O(devmemvec, frag_size) O(devmemvec, frag_token)
    O(sock_extended_err, ee_errno) O(sock_extended_err, ee_origin) O(sock_extended_err, ee_type)
    O(sock_extended_err, ee_code) O(sock_extended_err, ee_info) O(sock_extended_err, ee_data)
    O(IpcGpuMemFdMetadata, fd) O(IpcGpuMemFdMetadata, size) O(IpcGpuMemFdMetadata, align)
    printf("CMSG_LEN_12 %zu\nCMSG_SPACE_12 %zu\nCMSG_LEN_24 %zu\nCMSG_SPACE_24 %zu\n",
           (size_t)CMSG_LEN(12), (size_t)CMSG_SPACE(12), (size_t)CMSG_LEN(24), (size_t)CMSG_SPACE(24));
    printf("CMSG_LEN_4 %zu\nCMSG_SPACE_4 %zu\nCMSG_LEN_8 %zu\nCMSG_SPACE_8 %zu\n",
           (size_t)CMSG_LEN(4), (size_t)CMSG_SPACE(4), (size_t)CMSG_LEN(8), (size_t)CMSG_SPACE(8));
    printf("SO_EE_ORIGIN_ZEROCOPY %d\nSO_EE_CODE_ZEROCOPY_COPIED %d\nIP_RECVERR %d\nIPV6_RECVERR %d\n",
           SO_EE_ORIGIN_ZEROCOPY, SO_EE_CODE_ZEROCOPY_COPIED, IP_RECVERR, IPV6_RECVERR);
    printf("MSG_ERRQUEUE %d\nMSG_CTRUNC %d\nSO_ZEROCOPY %d\n", MSG_ERRQUEUE, MSG_CTRUNC, SO_ZEROCOPY);

    char buf[256]; struct msghdr m; struct cmsghdr *c;
    /* RX, upstream: a linear cmsg then a dmabuf fragment, as tcp_recvmsg_dmabuf writes them. */
    memset(buf, 0, sizeof buf); memset(&m, 0, sizeof m);
    m.msg_control = buf; m.msg_controllen = sizeof buf;
    c = CMSG_FIRSTHDR(&m);
    struct dmabuf_cmsg lin = { .frag_size = 66 };
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = 78; c->cmsg_len = CMSG_LEN(sizeof lin);
    memcpy(CMSG_DATA(c), &lin, sizeof lin);
    m.msg_controllen = CMSG_SPACE(sizeof lin);
    struct dmabuf_cmsg frag = { .frag_offset = 0x123456789ull, .frag_size = 4096,
                                .frag_token = 77, .dmabuf_id = 5 };
    c = (struct cmsghdr *)(buf + CMSG_SPACE(sizeof lin));
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = 79; c->cmsg_len = CMSG_LEN(sizeof frag);
    memcpy(CMSG_DATA(c), &frag, sizeof frag);
    hex("rx_upstream", buf, 2 * CMSG_SPACE(sizeof frag));
    /* RX, TCPX: a header cmsg (98) then an offset cmsg (99), struct devmemvec payloads. */
    memset(buf, 0, sizeof buf);
    struct devmemvec h = { .frag_size = 33 }, v = { .frag_offset = 0x2000, .frag_size = 1448, .frag_token = 9 };
    c = (struct cmsghdr *)buf;
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = 98; c->cmsg_len = CMSG_LEN(sizeof h);
    memcpy(CMSG_DATA(c), &h, sizeof h);
    c = (struct cmsghdr *)(buf + CMSG_SPACE(sizeof h));
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = 99; c->cmsg_len = CMSG_LEN(sizeof v);
    memcpy(CMSG_DATA(c), &v, sizeof v);
    hex("rx_tcpx", buf, 2 * CMSG_SPACE(sizeof v));
    /* TX: ncdevmem's SCM_DEVMEM_DMABUF u32 and tcpx.h's int[2]. */
    memset(buf, 0, sizeof buf);
    c = (struct cmsghdr *)buf; uint32_t id = 0x01020304;
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = 79; c->cmsg_len = CMSG_LEN(sizeof id);
    memcpy(CMSG_DATA(c), &id, sizeof id);
    hex("tx_upstream", buf, CMSG_SPACE(sizeof id));
    memset(buf, 0, sizeof buf);
    int pair[2] = { 7, 4096 };
    c = (struct cmsghdr *)buf;
    c->cmsg_level = SOL_SOCKET; c->cmsg_type = 99; c->cmsg_len = CMSG_LEN(sizeof pair);
    memcpy(CMSG_DATA(c), pair, sizeof pair);
    hex("tx_tcpx", buf, CMSG_SPACE(sizeof pair));
    /* Error queue: ip_recv_error's { sock_extended_err; sockaddr_in offender }. */
    memset(buf, 0, sizeof buf);
    struct { struct sock_extended_err ee; struct sockaddr_in offender; } e4;
    memset(&e4, 0, sizeof e4);
    e4.ee.ee_origin = SO_EE_ORIGIN_ZEROCOPY; e4.ee.ee_code = SO_EE_CODE_ZEROCOPY_COPIED;
    e4.ee.ee_info = 11; e4.ee.ee_data = 19;
    c = (struct cmsghdr *)buf;
    c->cmsg_level = SOL_IP; c->cmsg_type = IP_RECVERR; c->cmsg_len = CMSG_LEN(sizeof e4);
    memcpy(CMSG_DATA(c), &e4, sizeof e4);
    hex("errq_v4", buf, CMSG_SPACE(sizeof e4));
    memset(buf, 0, sizeof buf);
    struct { struct sock_extended_err ee; struct sockaddr_in6 offender; } e6;
    memset(&e6, 0, sizeof e6);
    e6.ee.ee_origin = SO_EE_ORIGIN_ZEROCOPY; e6.ee.ee_info = 0xfffffffe; e6.ee.ee_data = 1;
    c = (struct cmsghdr *)buf;
    c->cmsg_level = SOL_IPV6; c->cmsg_type = IPV6_RECVERR; c->cmsg_len = CMSG_LEN(sizeof e6);
    memcpy(CMSG_DATA(c), &e6, sizeof e6);
    hex("errq_v6", buf, CMSG_SPACE(sizeof e6));
    /* SO_DEVMEM_DONTNEED's array and gpumemd's pool metadata. */
    struct dmabuf_token t[2] = { { 5, 3 }, { 0x01020304, 1 } };
    hex("tokens", t, sizeof t);
    struct IpcGpuMemFdMetadata md; memset(&md, 0, sizeof md);
    md.fd = 7; md.size = 64u << 20; md.align = 2u << 20;
    hex("pool_metadata", &md, sizeof md);
    return 0;
}
"#;

/// The program's output, built and run once per test process.
fn c_output() -> Option<HashMap<String, String>> {
    static OUT: std::sync::OnceLock<Option<HashMap<String, String>>> = std::sync::OnceLock::new();
    OUT.get_or_init(compile_and_run).clone()
}

fn compile_and_run() -> Option<HashMap<String, String>> {
    let dir = std::env::temp_dir().join(format!("devmem-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, PROG).ok()?;
    let cc = match Command::new("cc").arg("-o").arg(&exe).arg(&src).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: no C compiler `cc`: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
    };
    assert!(
        cc.status.success(),
        "layout.c did not compile: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().expect("run layout program");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8(out.stdout).expect("utf8");
    Some(
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

fn num(c: &HashMap<String, String>, k: &str) -> usize {
    c.get(k)
        .unwrap_or_else(|| panic!("{k} missing"))
        .parse()
        .unwrap()
}

fn bytes(c: &HashMap<String, String>, k: &str) -> Vec<u8> {
    let h = c.get(k).unwrap_or_else(|| panic!("{k} missing"));
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn struct_sizes_and_offsets_match_the_c_compiler() {
    let Some(c) = c_output() else { return };
    assert_eq!(num(&c, "sizeof_cmsghdr"), CMSG_HDR_LEN);
    assert_eq!(num(&c, "cmsghdr.cmsg_level"), 8);
    assert_eq!(num(&c, "cmsghdr.cmsg_type"), 12);
    assert_eq!(
        num(&c, "sizeof_dmabuf_cmsg"),
        KernelAbi::Upstream.rx_payload_len()
    );
    assert_eq!(
        num(&c, "sizeof_devmemvec"),
        KernelAbi::Tcpx.rx_payload_len()
    );
    for (field, at) in [
        ("frag_offset", 0),
        ("frag_size", 8),
        ("frag_token", 12),
        ("dmabuf_id", 16),
        ("flags", 20),
    ] {
        assert_eq!(num(&c, &format!("dmabuf_cmsg.{field}")), at, "{field}");
    }
    for (field, at) in [("frag_offset", 0), ("frag_size", 4), ("frag_token", 8)] {
        assert_eq!(num(&c, &format!("devmemvec.{field}")), at, "{field}");
    }
    assert_eq!(num(&c, "sizeof_dmabuf_token"), 8);
    assert_eq!(num(&c, "sizeof_devmemtoken"), 8);
    assert_eq!(num(&c, "sizeof_sock_extended_err"), SOCK_EE_LEN);
    assert_eq!(num(&c, "sock_extended_err.ee_origin"), 4);
    assert_eq!(num(&c, "sock_extended_err.ee_code"), 6);
    assert_eq!(num(&c, "sock_extended_err.ee_info"), 8);
    assert_eq!(num(&c, "sock_extended_err.ee_data"), 12);
    assert_eq!(num(&c, "sizeof_sockaddr_in"), OFFENDER_V4_LEN);
    assert_eq!(num(&c, "sizeof_sockaddr_in6"), OFFENDER_V6_LEN);
    assert_eq!(
        num(&c, "sizeof_IpcGpuMemFdMetadata"),
        PoolMetadata::WIRE_LEN
    );
    assert_eq!(num(&c, "IpcGpuMemFdMetadata.size"), 8);
    assert_eq!(num(&c, "IpcGpuMemFdMetadata.align"), 16);
    // The TCPX kernel's TX-pages ioctl.
    use devmem::sockabi::sys::{DmaBufCreatePagesInfo, DMA_BUF_CREATE_PAGES};
    assert_eq!(
        num(&c, "sizeof_dma_buf_create_pages_info"),
        std::mem::size_of::<DmaBufCreatePagesInfo>()
    );
    assert_eq!(
        num(&c, "dma_buf_create_pages_info.dma_buf_fd"),
        std::mem::offset_of!(DmaBufCreatePagesInfo, dma_buf_fd)
    );
    assert_eq!(
        num(&c, "dma_buf_create_pages_info.create_page_pool"),
        std::mem::offset_of!(DmaBufCreatePagesInfo, create_page_pool)
    );
    assert_eq!(num(&c, "DMA_BUF_CREATE_PAGES") as u64, DMA_BUF_CREATE_PAGES);
    // netlink framing used by bind-rx / bind-tx (devmem::netlink).
    assert_eq!(num(&c, "sizeof_nlmsghdr"), 16);
    assert_eq!(num(&c, "sizeof_genlmsghdr"), 4);
    assert_eq!(num(&c, "sizeof_nlattr"), 4);
    for p in [4usize, 8, 12, 24] {
        assert_eq!(
            num(&c, &format!("CMSG_LEN_{p}")),
            cmsg_len(p),
            "CMSG_LEN({p})"
        );
        assert_eq!(
            num(&c, &format!("CMSG_SPACE_{p}")),
            cmsg_space(p),
            "CMSG_SPACE({p})"
        );
    }
    assert_eq!(
        num(&c, "SO_EE_ORIGIN_ZEROCOPY"),
        devmem::sockabi::errqueue::SO_EE_ORIGIN_ZEROCOPY as usize
    );
    assert_eq!(
        num(&c, "IP_RECVERR"),
        devmem::sockabi::errqueue::IP_RECVERR as usize
    );
    assert_eq!(
        num(&c, "IPV6_RECVERR"),
        devmem::sockabi::errqueue::IPV6_RECVERR as usize
    );
    assert_eq!(
        num(&c, "MSG_CTRUNC"),
        devmem::sockabi::abi::MSG_CTRUNC as usize
    );
}

#[test]
fn control_buffers_built_with_the_cmsg_macros_parse_and_are_rebuilt_byte_for_byte() {
    let Some(c) = c_output() else { return };
    // RX, upstream.
    let up = bytes(&c, "rx_upstream");
    let frags = parse_rx(KernelAbi::Upstream, &up, 66 + 4096, 0).unwrap();
    assert_eq!(
        frags,
        [
            Fragment::Linear { len: 66 },
            Fragment::Pool {
                offset: 0x1_2345_6789,
                len: 4096,
                token: 77,
                dmabuf_id: Some(5)
            }
        ]
    );
    let mut ours = Vec::new();
    encode_rx(KernelAbi::Upstream, &frags, &mut ours).unwrap();
    assert_eq!(ours, up);
    // RX, TCPX.
    let tcpx = bytes(&c, "rx_tcpx");
    let frags = parse_rx(KernelAbi::Tcpx, &tcpx, 33 + 1448, 0).unwrap();
    assert_eq!(
        frags,
        [
            Fragment::Linear { len: 33 },
            Fragment::Pool {
                offset: 0x2000,
                len: 1448,
                token: 9,
                dmabuf_id: None
            }
        ]
    );
    let mut ours = Vec::new();
    encode_rx(KernelAbi::Tcpx, &frags, &mut ours).unwrap();
    assert_eq!(ours, tcpx);
    // TX.
    let up = encode_tx(TxTarget::Upstream {
        binding_id: 0x0102_0304,
    });
    assert_eq!(up.as_bytes(), bytes(&c, "tx_upstream"));
    let t = encode_tx(TxTarget::Tcpx {
        dmabuf_fd: 7,
        offset: 4096,
    });
    assert_eq!(t.as_bytes(), bytes(&c, "tx_tcpx"));
    // Error queue.
    for (name, range, v6) in [
        (
            "errq_v4",
            ZcRange {
                lo: 11,
                hi: 19,
                copied: true,
            },
            false,
        ),
        (
            "errq_v6",
            ZcRange {
                lo: 0xffff_fffe,
                hi: 1,
                copied: false,
            },
            true,
        ),
    ] {
        let want = bytes(&c, name);
        assert_eq!(
            parse_errqueue(&want).unwrap(),
            [ErrRecord::Zerocopy(range)],
            "{name}"
        );
        let mut ours = Vec::new();
        encode_zerocopy(range, v6, &mut ours);
        assert_eq!(ours, want, "{name}");
    }
    // Token ranges and the daemon's metadata.
    let mut toks = Vec::new();
    encode_token_ranges(
        &[
            TokenRange { start: 5, count: 3 },
            TokenRange {
                start: 0x0102_0304,
                count: 1,
            },
        ],
        &mut toks,
    );
    assert_eq!(toks, bytes(&c, "tokens"));
    let md = PoolMetadata {
        daemon_fd: 7,
        size: 64 << 20,
        align: 2 << 20,
    };
    assert_eq!(md.to_bytes().to_vec(), bytes(&c, "pool_metadata"));
}
